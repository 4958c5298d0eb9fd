#!/bin/sh
# Create Temporal's two databases in PostgreSQL and bring their schemas up to the version of
# this temporalio/admin-tools image. Idempotent (an existing database is kept, a schema is only
# ever moved forward), so compose's `temporal-admin-tools` job runs it on every
# `docker compose up`; after bumping TEMPORAL_VERSION it applies the new schema versions
# before the new server starts. Adapted from temporalio/samples-server compose/scripts.
set -eu

: "${POSTGRES_SEEDS:?the PostgreSQL host}"
: "${POSTGRES_USER:?the PostgreSQL user}"
: "${SQL_PASSWORD:?the PostgreSQL password (read by temporal-sql-tool)}"
: "${DB_PORT:=5432}"
schema_dir=/etc/temporal/schema/postgresql/v12

sql_tool() {
    temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -p "$DB_PORT" -u "$POSTGRES_USER" "$@"
}

for db in temporal temporal_visibility; do
    case "$db" in
        temporal) versioned="$schema_dir/temporal/versioned" ;;
        *) versioned="$schema_dir/visibility/versioned" ;;
    esac
    echo "setup-schema: $db"
    sql_tool --db "$db" create
    sql_tool --db "$db" setup-schema -v 0.0
    sql_tool --db "$db" update-schema -d "$versioned"
done
echo "setup-schema: done"
