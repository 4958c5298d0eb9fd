#!/bin/sh
# Create upsertflow's namespace and register its search attributes, then wait until the
# frontend accepts queries on them. Idempotent: compose's `temporal-setup` job runs it on
# every `docker compose up` (in the temporalio/admin-tools image); run it by hand against
# any self-hosted cluster:
#   TEMPORAL_ADDRESS=temporal.internal:7233 TEMPORAL_NAMESPACE=upsertflow sh deploy/temporal/setup-namespace.sh
# (Temporal Cloud: use the Cloud UI or `tcld`, see README.md, "Pointing at Temporal Cloud".)
set -eu

: "${TEMPORAL_ADDRESS:=temporal:7233}"
: "${TEMPORAL_NAMESPACE:=default}"
: "${TEMPORAL_NAMESPACE_RETENTION:=72h}"
# name=Type pairs; the same as workflows.SEARCH_ATTRIBUTES (tests/test_deploy.py checks it).
: "${SEARCH_ATTRIBUTES:=ResourceId=Keyword ResourceVersion=Int EtlStatus=Keyword}"
: "${TEMPORAL_CLI:=temporal}"
: "${SETUP_ATTEMPTS:=60}"
: "${SETUP_SLEEP_SECONDS:=2}"

cli() {
    "$TEMPORAL_CLI" "$@" --address "$TEMPORAL_ADDRESS"
}

# retry CMD...: run CMD until it succeeds, at most SETUP_ATTEMPTS times.
retry() {
    attempt=1
    until "$@"; do
        if [ "$attempt" -ge "$SETUP_ATTEMPTS" ]; then
            echo "setup-namespace: giving up after $attempt attempts: $*" >&2
            return 1
        fi
        attempt=$((attempt + 1))
        sleep "$SETUP_SLEEP_SECONDS"
    done
}

ensure_namespace() {
    cli operator namespace describe --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1 \
        || cli operator namespace create --namespace "$TEMPORAL_NAMESPACE" \
            --retention "$TEMPORAL_NAMESPACE_RETENTION"
}

# The CLI adds an attribute that is missing and accepts one that exists with the same type,
# so a rerun changes nothing; one that exists with another type is a conflict no retry fixes.
create_search_attribute() {
    if output=$(cli operator search-attribute create --namespace "$TEMPORAL_NAMESPACE" \
        --name "$1" --type "$2" 2>&1); then
        echo "$output"
        return 0
    fi
    echo "$output" >&2
    case "$output" in
        *"different type"*) exit 1 ;;
    esac
    return 1
}

# A new namespace or attribute reaches the frontend's caches a few seconds later; a
# visibility query naming every attribute succeeds only once all of them are usable.
query_accepts_attributes() {
    cli workflow list --namespace "$TEMPORAL_NAMESPACE" --limit 1 --query "$probe_query" >/dev/null
}

echo "setup-namespace: waiting for Temporal at $TEMPORAL_ADDRESS"
retry cli operator cluster health

echo "setup-namespace: namespace $TEMPORAL_NAMESPACE"
retry ensure_namespace

probe_query=""
for pair in $SEARCH_ATTRIBUTES; do
    name=${pair%%=*}
    type=${pair#*=}
    echo "setup-namespace: search attribute $name ($type)"
    retry create_search_attribute "$name" "$type"
    case "$type" in
        Int | Double) value=0 ;;
        Bool) value=false ;;
        Datetime) value="'1970-01-01T00:00:00Z'" ;;
        *) value="'setup-probe'" ;;
    esac
    probe_query="${probe_query:+$probe_query AND }$name = $value"
done

retry query_accepts_attributes
echo "setup-namespace: ready ($probe_query)"
