#!/bin/sh
# The image's entrypoint: raise the open-files soft limit to the hard limit the container was
# given (each event stream holds a socket; a process may raise its soft limit up to the hard one
# without privileges), then `exec regstream ARGS`: the service replaces this shell as the
# container's main process, so SIGTERM reaches it directly and starts its drain.
set -eu
ulimit -n "$(ulimit -H -n)" 2>/dev/null || true
exec regstream "$@"
