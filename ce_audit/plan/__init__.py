"""Planning a sweep: the grid's cases and their seeded input generators, and the sizes refused up front."""
