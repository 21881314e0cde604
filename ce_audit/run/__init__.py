"""The run machinery: the sweep's orchestration, executors (in process, worker processes, Ray), shards and
merge, isolation of user implementations, interruption and progress; ``audit``: a sweep or replay from
a command's values to its written report."""
