#!/bin/sh
# fedraft-entrypoint: turn secret files into environment variables, then exec the command.
#
# For every variable NAME_FILE whose NAME starts with FEDRAFT_ or is PGPASSWORD, this
# exports NAME with the file's contents (trailing newlines removed) and unsets NAME_FILE.
# So a container or unit can keep the Raft password in a mounted secret:
#
#   FEDRAFT_RAFT_PASSWORD_FILE=/run/secrets/raft_password   ->  FEDRAFT_RAFT_PASSWORD=...
#   PGPASSWORD_FILE=/run/secrets/postgres_password           ->  PGPASSWORD=... (libpq)
#
# Setting both NAME and NAME_FILE is an error, as is an unreadable file.
set -eu

if [ "$#" -eq 0 ]; then
    echo "fedraft-entrypoint: no command given" >&2
    exit 2
fi

for file_var in $(env | sed -n 's/^\(FEDRAFT_[A-Z0-9_]*_FILE\)=.*/\1/p; s/^\(PGPASSWORD_FILE\)=.*/\1/p'); do
    name=${file_var%_FILE}
    eval "path=\${$file_var}"
    eval "already=\${$name+set}"
    if [ "$already" = set ]; then
        echo "fedraft-entrypoint: both $name and $file_var are set; keep one" >&2
        exit 2
    fi
    if [ ! -r "$path" ]; then
        echo "fedraft-entrypoint: $file_var: cannot read $path" >&2
        exit 2
    fi
    value=$(cat "$path")
    export "$name=$value"
    unset "$file_var"
done

exec "$@"
