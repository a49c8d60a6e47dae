#!/usr/bin/env bash
# Rolling deploy of jobyard with docker compose.
#
# For each worker service: start the new containers NEXT TO the old ones, wait until
# every new one passes its health check, and only then stop the old ones with their
# full grace period (they finish in-flight jobs on SIGTERM). If a new container fails
# its health check, the new ones are stopped and removed and the old ones keep running
# untouched; the script exits non-zero.
#
# It runs wherever the docker CLI can reach the target engine: on the host itself, or
# from CI with DOCKER_HOST=ssh://user@host (nothing is copied to the host).
#
# Environment:
#   JOBYARD_WORKER_IMAGE           image for `worker` and `migrate` (required)
#   JOBYARD_TEMPORAL_WORKER_IMAGE  image for `temporal-worker` (required)
#   WORKER_REPLICAS                Dramatiq worker containers to end with (default 1)
#   TEMPORAL_WORKER_REPLICAS       Temporal worker containers (default 1)
#   HEALTH_TIMEOUT                 seconds a new container gets to become healthy (300)
#   HEALTH_POLL_INTERVAL           seconds between health polls (5)
#   STOP_GRACE_SECONDS             stop timeout when a container does not carry one (45)
#   COMPOSE_FILE                   compose file (default: ../compose.yaml next to this)
#   plus every variable compose.yaml interpolates (POSTGRES_PASSWORD, ...).
#
# Usage: rolling-deploy.sh            deploy everything
#        rolling-deploy.sh worker     roll only the named services (after migrating)

set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
compose_file="${COMPOSE_FILE:-${script_dir}/../compose.yaml}"
worker_replicas="${WORKER_REPLICAS:-1}"
temporal_worker_replicas="${TEMPORAL_WORKER_REPLICAS:-1}"
health_timeout="${HEALTH_TIMEOUT:-300}"
health_poll_interval="${HEALTH_POLL_INTERVAL:-5}"
default_stop_grace="${STOP_GRACE_SECONDS:-45}"

# The services that need their infrastructure up before the workers roll.
infrastructure_services=(redis postgres temporal temporal-ui)

log() {
    printf '[rolling-deploy] %s\n' "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

compose() {
    docker compose --file "${compose_file}" "$@"
}

require_positive_integer() {
    local name="$1" value="$2"
    [[ "${value}" =~ ^[1-9][0-9]*$ ]] || die "${name} must be a positive integer, got '${value}'"
}

# Prints the ids of every container of a service, running or not, one per line.
service_container_ids() {
    compose ps --quiet --all "$1"
}

# Succeeds once every container given is running and healthy; fails as soon as one is
# unhealthy, has exited, has no health check, or the timeout passes.
wait_until_healthy() {
    local deadline=$((SECONDS + health_timeout))
    local id state pending
    while true; do
        pending=0
        for id in "$@"; do
            state="$(docker inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "${id}")"
            case "${state}" in
                "running healthy") ;;
                "running starting") pending=1 ;;
                "running none")
                    log "container ${id} has no health check: refusing to judge it healthy"
                    return 1
                    ;;
                *)
                    log "container ${id} failed: ${state}"
                    return 1
                    ;;
            esac
        done
        if ((pending == 0)); then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            log "containers not healthy after ${health_timeout}s: $*"
            return 1
        fi
        sleep "${health_poll_interval}"
    done
}

# Stops containers with the stop timeout compose gave them (stop_grace_period), so a
# worker always gets longer than WORKER_SHUTDOWN_GRACE to finish its jobs, then
# removes them.
stop_gracefully() {
    local id grace
    for id in "$@"; do
        grace="$(docker inspect --format '{{.Config.StopTimeout}}' "${id}")"
        [[ "${grace}" =~ ^[0-9]+$ ]] || grace="${default_stop_grace}"
        log "stopping ${id} (grace ${grace}s)"
        docker stop --time "${grace}" "${id}" >/dev/null
    done
    docker rm "$@" >/dev/null
}

# Rolls one service to `replicas` containers of its current image and config.
roll_service() {
    local service="$1" replicas="$2"
    local -a old_ids=() new_ids=()
    local id

    mapfile -t old_ids < <(service_container_ids "${service}")
    log "${service}: ${#old_ids[@]} old container(s), starting ${replicas} new"

    # --no-recreate keeps the old containers as they are; scaling to old + new makes
    # compose create only the new ones, from the new image. --no-deps: the
    # infrastructure is already up and the migration already ran.
    local scale_up_ok=1
    compose up --detach --no-deps --no-recreate --no-build \
        --scale "${service}=$((${#old_ids[@]} + replicas))" "${service}" || scale_up_ok=0

    # Whatever compose managed to create is "new", even when it failed half-way, so a
    # rollback removes it too.
    for id in $(service_container_ids "${service}"); do
        if [[ " ${old_ids[*]} " != *" ${id} "* ]]; then
            new_ids+=("${id}")
        fi
    done

    if ((scale_up_ok == 0 || ${#new_ids[@]} != replicas)) \
        || ! wait_until_healthy "${new_ids[@]}"; then
        log "${service}: new containers did not come up healthy, rolling back;" \
            "the ${#old_ids[@]} old one(s) keep running"
        if ((${#new_ids[@]} > 0)); then
            stop_gracefully "${new_ids[@]}"
        fi
        return 1
    fi

    if ((${#old_ids[@]} > 0)); then
        log "${service}: new containers healthy, stopping the old ones"
        stop_gracefully "${old_ids[@]}"
    fi
    log "${service}: rolled out ${#new_ids[@]} container(s)"
}

main() {
    [[ -n "${JOBYARD_WORKER_IMAGE:-}" ]] || die "JOBYARD_WORKER_IMAGE is not set"
    [[ -n "${JOBYARD_TEMPORAL_WORKER_IMAGE:-}" ]] || die "JOBYARD_TEMPORAL_WORKER_IMAGE is not set"
    [[ -f "${compose_file}" ]] || die "compose file not found: ${compose_file}"
    require_positive_integer WORKER_REPLICAS "${worker_replicas}"
    require_positive_integer TEMPORAL_WORKER_REPLICAS "${temporal_worker_replicas}"

    local -a services=("$@")
    if ((${#services[@]} == 0)); then
        services=(worker temporal-worker)
    fi

    log "pulling ${JOBYARD_WORKER_IMAGE} and ${JOBYARD_TEMPORAL_WORKER_IMAGE}"
    compose pull --quiet migrate worker temporal-worker

    # Infrastructure is started if missing but never recreated by a deploy: restarting
    # Redis or PostgreSQL is a deliberate operation, not a side effect of a release.
    log "ensuring infrastructure is up: ${infrastructure_services[*]}"
    compose up --detach --no-recreate --wait --wait-timeout "${health_timeout}" \
        "${infrastructure_services[@]}"

    # Migrations run before any new worker starts; old workers must tolerate the new
    # schema for the length of the rollout (expand/contract migrations).
    log "migrating the database"
    compose run --rm --no-deps migrate

    local service
    for service in "${services[@]}"; do
        case "${service}" in
            worker) roll_service worker "${worker_replicas}" ;;
            temporal-worker) roll_service temporal-worker "${temporal_worker_replicas}" ;;
            *) die "unknown service '${service}' (expected worker or temporal-worker)" ;;
        esac
    done
    log "deploy complete"
}

main "$@"
