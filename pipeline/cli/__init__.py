"""The `probe-rl` command line (`main`), Ray job submission to a cluster (`jobs`) and the probe tools
(`probe_cli`). Floor 5: may import everything below it; nothing imports it."""
