"""Runs about runs: experiments over arms and seeds (`experiment`) and their report (`report`), the overhead
profile of probes against plain RL (`profile`) and the FLOP/memory cost model (`cost`). Floor 4: imports floors
0-3; never `cli/`."""
