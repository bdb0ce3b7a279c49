#!/bin/sh
# The images' entrypoint. `docker run IMAGE run --config configs/gpu.toml` runs probe-rl; any other command runs
# as given: Ray's cluster launcher starts its containers as `docker run ... IMAGE bash` and then runs `ray start`
# in them, and KubeRay gives its pods a command of its own, so an entrypoint of `probe-rl` alone would turn the
# launcher's `bash` into `probe-rl bash`, which exits, and every `ray start` after it would fail.
set -e
case "${1:-}" in
  "") exec probe-rl --help ;;
  -*|run|submit|status|logs|stop|probe|experiment|cost|profile|report) exec probe-rl "$@" ;;
  *) exec "$@" ;;
esac
