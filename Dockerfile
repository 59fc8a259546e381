# syntax=docker/dockerfile:1.7
# One build, three images:
#   docker build --target operator -t ghcr.io/tether-dev/tether-operator:0.1.0 .
#   docker build --target gateway  -t ghcr.io/tether-dev/tether-gateway:0.1.0 .
#   docker build --target session  -t ghcr.io/tether-dev/tether:0.1.0 .
# The chart's values (image.registry, image.tag) and the operator's --session-image follow
# these names. All images run as non-root users with no shell for the control-plane parts.

FROM node:20-bookworm AS web
WORKDIR /web
COPY ws-gateway/web/package.json ws-gateway/web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY ws-gateway/web/ ./
RUN npm run build

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
COPY --from=web /web/dist ws-gateway/web/dist
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p tether-operator -p tether-gateway -p tether-session-agent \
 && mkdir -p /out \
 && cp target/release/tether-operator target/release/tether-gateway \
       target/release/tether-session-agent /out/ \
 && (cp target/release/kubectl-tether /out/ 2>/dev/null || true)

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/tether-operator /usr/local/bin/tether-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tether-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
COPY --from=build /out/tether-gateway /usr/local/bin/tether-gateway
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["/usr/local/bin/tether-gateway"]

# The session image: the agent, tmux and the shells users ask for. The operator mounts writable
# emptyDirs for the home directory and /tmp, so the root file system stays read-only.
FROM debian:bookworm-slim AS session
RUN apt-get update \
 && apt-get install -y --no-install-recommends tmux bash zsh fish ca-certificates less vim-tiny procps locales \
 && sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' /etc/locale.gen && locale-gen \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 tether && useradd --uid 1000 --gid 1000 --home-dir /home/tether --shell /bin/bash tether
ENV LANG=en_US.UTF-8 TERM=xterm-256color
COPY --from=build /out/tether-session-agent /usr/local/bin/tether-session-agent
USER 1000:1000
WORKDIR /home/tether
EXPOSE 7681
ENTRYPOINT ["/usr/local/bin/tether-session-agent"]
