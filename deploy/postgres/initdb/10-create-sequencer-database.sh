#!/bin/sh
# Create Sequencer's own role and database next to Temporal's.
#
# The postgres image runs this file only when it initializes an empty data directory, so
# changing SEQUENCER_DB_PASSWORD later needs `ALTER ROLE sequencer PASSWORD ...` by hand.
# The image executes the file when it is executable and sources it otherwise, and this
# script works both ways.
set -e

if [ -z "${SEQUENCER_DB_PASSWORD:-}" ]; then
    echo "SEQUENCER_DB_PASSWORD is missing or empty: set it before the first start" >&2
    exit 1
fi

# psql expands :'password' into a quoted SQL literal, so any character in the password is safe.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v password="$SEQUENCER_DB_PASSWORD" <<'SQL'
CREATE ROLE sequencer LOGIN PASSWORD :'password';
CREATE DATABASE sequencer OWNER sequencer;
REVOKE ALL ON DATABASE sequencer FROM PUBLIC;
SQL
