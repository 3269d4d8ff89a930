# weft and Debian's HAProxy in one image, the way marathon-lb is run: by Marathon itself, on the
# host's network (HAProxy binds the edge's port 80; weft keeps the host's weave bridge up).
#
#   docker build -t weft .
#   docker run -d --name weft --network host --cap-add NET_ADMIN \
#       -v /etc/weft:/etc/weft:ro -v /var/lib/weft:/var/lib/weft weft
#
# --network host: HAProxy must listen on the host's addresses and reach the containers on the
# weave network; weft's bridge repairs act on the host's links. NET_ADMIN: those repairs (drop
# it with bridge.mode = "check" or "off"). The container runs as root because HAProxy's master
# binds port 80 and switches its workers to the haproxy user, chrooted (Docker's default
# capabilities hold SETUID, SETGID, SYS_CHROOT, KILL, NET_BIND_SERVICE). /var/lib/weft on the
# host keeps run_dir across container restarts, so that a new container's weft adopts the
# HAProxy... of the same container only: a container's processes die with it, so prefer
# `docker kill -s HUP weft` (weft re-executes in place) to a container restart.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends haproxy iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/weft /usr/bin/weft
COPY haproxy/examples/weft.toml /etc/weft/weft.toml
COPY haproxy/examples/services.toml /etc/weft/services.toml
# weft is PID 1: it handles SIGTERM (HAProxy keeps serving until the container ends) and SIGHUP.
ENV WEFT_LOG=info WEFT_LOG_FORMAT=json
HEALTHCHECK --interval=10s --timeout=5s CMD ["weft", "status", "-c", "/etc/weft/weft.toml"]
ENTRYPOINT ["weft"]
CMD ["run", "-c", "/etc/weft/weft.toml"]
