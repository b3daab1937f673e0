#!/bin/sh
# Create the Temporal namespace and register Sequencer's custom search attributes.
#
# It needs a running server, so it cannot be part of setup-schema.sh. docker compose runs it
# on every start, so each step checks what exists before it creates anything.
set -eu

: "${TEMPORAL_ADDRESS:?TEMPORAL_ADDRESS is missing}"
: "${TEMPORAL_NAMESPACE:?TEMPORAL_NAMESPACE is missing}"
: "${TEMPORAL_NAMESPACE_RETENTION:?TEMPORAL_NAMESPACE_RETENTION is missing}"
: "${SEQUENCER_SEARCH_ATTRIBUTES:?SEQUENCER_SEARCH_ATTRIBUTES is missing}"

# Run a command until it succeeds, at most 30 times with 2 s between tries. The server
# accepts connections before all its services are up, and a new namespace may not be
# visible to the next call at once, so the first calls may fail.
retry() {
    attempt=1
    until "$@"; do
        if [ "$attempt" -ge 30 ]; then
            echo "Failed after $attempt attempts: $*" >&2
            return 1
        fi
        attempt=$((attempt + 1))
        sleep 2
    done
}

ensure_namespace() {
    if temporal operator namespace describe --address "$TEMPORAL_ADDRESS" \
        --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1; then
        echo "Namespace $TEMPORAL_NAMESPACE exists"
        return 0
    fi
    echo "Creating namespace $TEMPORAL_NAMESPACE with retention $TEMPORAL_NAMESPACE_RETENTION"
    temporal operator namespace create --address "$TEMPORAL_ADDRESS" \
        --namespace "$TEMPORAL_NAMESPACE" --retention "$TEMPORAL_NAMESPACE_RETENTION"
}

ensure_keyword_search_attribute() {
    name=$1
    existing=$(temporal operator search-attribute list --address "$TEMPORAL_ADDRESS" \
        --namespace "$TEMPORAL_NAMESPACE") || return 1
    if printf '%s\n' "$existing" | grep -qw "$name"; then
        echo "Search attribute $name exists"
        return 0
    fi
    echo "Creating search attribute $name of type Keyword"
    temporal operator search-attribute create --address "$TEMPORAL_ADDRESS" \
        --namespace "$TEMPORAL_NAMESPACE" --name "$name" --type Keyword
}

retry temporal operator cluster health --address "$TEMPORAL_ADDRESS"
retry ensure_namespace
for name in $SEQUENCER_SEARCH_ATTRIBUTES; do
    retry ensure_keyword_search_attribute "$name"
done
echo "Namespace $TEMPORAL_NAMESPACE is ready"
