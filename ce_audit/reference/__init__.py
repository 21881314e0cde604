"""The accurate reference: the exact loss and gradient of every audited formulation, rounded once.

``cross_entropy`` (plain CE, Blanchard, Higham & Higham 2021), ``variants`` (every loss option), ``parts``
and ``gradient`` (the double-word gradient where terms cancel), ``binary`` (BCE), ``exact`` (error-free
transformations) and ``device`` (plain CE on the audited CUDA device).
"""
