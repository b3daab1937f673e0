#!/bin/sh
# Create the Temporal persistence and visibility databases and migrate both schemas to the
# versions that ship in this admin-tools image.
#
# docker compose runs this on every `up`, so each step must be safe to repeat. `create`
# ignores a database that exists, `setup-schema -v 0.0` leaves a newer schema version alone,
# and `update-schema` applies only the missing versions.
# temporal-sql-tool reads the password from SQL_PASSWORD, which keeps it off the command line.
set -eu

: "${SQL_PASSWORD:?SQL_PASSWORD is missing: set POSTGRES_PASSWORD for docker compose}"

schema_root=/etc/temporal/schema/postgresql/v12

sql_tool() {
    temporal-sql-tool --plugin postgres12 --endpoint postgresql --port 5432 --user temporal "$@"
}

migrate() {
    database=$1
    schema_dir=$2
    echo "Migrating database $database with $schema_dir"
    sql_tool --database "$database" create
    sql_tool --database "$database" setup-schema -v 0.0
    sql_tool --database "$database" update-schema -d "$schema_dir"
}

migrate temporal "$schema_root/temporal/versioned"
migrate temporal_visibility "$schema_root/visibility/versioned"
echo "Temporal schemas are up to date"
