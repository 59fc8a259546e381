# syntax=docker/dockerfile:1.7
# One build, three images:
#   docker build --target operator -t ghcr.io/tether-dev/tether-operator:0.1.0 .
#   docker build --target gateway  -t ghcr.io/tether-dev/tether-gateway:0.1.0 .
#   docker build --target session  -t ghcr.io/tether-dev/tether:0.1.0 .
# The chart's values (image.registry, image.tag) and the operator's --session-image follow
# these names. All images run as non-root users with no shell for the control-plane parts.
#
# Those commands are unchanged: every build argument below defaults to what they always did.
#
# Without Docker, a registry, or the rust and node images (a Debian host with buildah, which is
# how the tests and `cargo dev` build: e2e/src/images.rs, `tether_e2e::images::build`), the
# same final stages are fed by build arguments instead:
#
# - BINARIES=prebuilt takes the three binaries from a build context named `tether-binaries`, a
#   directory holding tether-operator, tether-gateway and tether-session-agent built on a Debian
#   bookworm host (cargo build), instead of the `build` stage; `web` and `build` are skipped.
# - RUNTIME_BASE and SESSION_BASE name the base images (defaults: the upstream ones). Offline,
#   they are local stand-ins built with mmdebstrap from Debian bookworm packages: RUNTIME_BASE
#   has glibc, libgcc, libstdc++, libssl, ca-certificates, tzdata and netbase, a `nonroot`
#   user 65532 and no shell (like distroless cc-debian12); SESSION_BASE is debootstrap's
#   minbase with slim's dpkg excludes and apt settings (like debian:bookworm-slim), so the RUN
#   of `session-system` runs unchanged, apt-get against Debian's mirror.
# - SESSION_SYSTEM may name an image built earlier with --target session-system, so that
#   a new agent binary does not run apt again. Default: the stage itself.
#
#   buildah --storage-driver vfs build --isolation chroot --pull=never --target operator \
#     --build-arg BINARIES=prebuilt --build-context tether-binaries=target/debug \
#     --build-arg RUNTIME_BASE=localhost/tether/base-runtime:<key> \
#     --build-arg SESSION_BASE=localhost/tether/base-session:<key> \
#     -t localhost/tether/tether-operator:dev .
#
# With BuildKit, `docker buildx build --build-arg BINARIES=prebuilt --build-context
# tether-binaries=DIR` takes host-built binaries the same way (not tried here: no Docker).

ARG BINARIES=build
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot
ARG SESSION_BASE=debian:bookworm-slim
ARG SESSION_SYSTEM=session-system

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
       target/release/tether-session-agent /out/

# Binaries built outside this Dockerfile (BINARIES=prebuilt), laid out as `build` leaves them.
FROM scratch AS prebuilt
COPY --from=tether-binaries tether-operator tether-gateway tether-session-agent /out/

# What the final stages copy from: `build` unless BINARIES says otherwise.
FROM ${BINARIES} AS binaries

FROM ${RUNTIME_BASE} AS operator
COPY --from=binaries /out/tether-operator /usr/local/bin/tether-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tether-operator"]

FROM ${RUNTIME_BASE} AS gateway
COPY --from=binaries /out/tether-gateway /usr/local/bin/tether-gateway
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["/usr/local/bin/tether-gateway"]

# The session image's system: tmux, the shells users ask for, a locale and the `tether` user.
# A stage of its own only so that a build which changes nothing but the agent can start from an
# image of it (SESSION_SYSTEM, below) instead of running apt again; `session` is the same image.
#
# tmux is Debian sid's (3.8 when this was written), not bookworm's 3.3a: from 3.7 on control
# mode batches output instead of formatting every byte with printf (×2 the throughput measured
# here), reports bracketed paste, and loses the last output of a dying pane less often. sid's
# tmux needs a newer glibc than any stable release has, and the rest of the image stays on a
# stable, security-supported base; so the tmux binary and the libraries it links (glibc
# included) are unpacked from sid's packages into /opt/tmux, and the binary is pointed at them
# with an ELF interpreter and RPATH of its own (patchelf). Nothing else uses those libraries:
# programs tmux starts (the shell) run with the system's. The agent itself is built for bookworm.
FROM ${SESSION_BASE} AS session-system
# `false` only for a mirror that serves a frozen snapshot of sid, whose Release file's
# Valid-Until has passed (the tests' offline mirror); signatures are checked either way.
ARG APT_CHECK_VALID_UNTIL=true
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash zsh fish ca-certificates less vim-tiny procps locales patchelf \
 && sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' /etc/locale.gen && locale-gen \
 && echo 'deb http://deb.debian.org/debian sid main' > /etc/apt/sources.list.d/tmux-from-sid.list \
 && printf 'Package: *\nPin: release n=sid\nPin-Priority: 1\n' > /etc/apt/preferences.d/tmux-from-sid \
 && apt-get -o Acquire::Check-Valid-Until="$APT_CHECK_VALID_UNTIL" update \
 && mkdir -p /tmp/tmux-debs /opt/tmux && cd /tmp/tmux-debs \
 && apt-get download tmux/sid libc6/sid libevent-core-2.1-7t64/sid libjemalloc2/sid \
      libsystemd0/sid libtinfo6/sid libgcc-s1/sid libstdc++6/sid \
 && for deb in *.deb; do dpkg-deb -x "$deb" /opt/tmux; done \
 && install -m 0755 /opt/tmux/usr/bin/tmux /usr/bin/tmux \
 && rm -rf /opt/tmux/usr/bin /opt/tmux/usr/sbin /opt/tmux/usr/share /opt/tmux/etc /opt/tmux/usr/libexec \
 && lib="$(dirname /opt/tmux/usr/lib/*/libc.so.6)" && ld="$(ls "$lib"/ld-linux*.so.*)" \
 && patchelf --set-interpreter "$ld" --force-rpath --set-rpath "$lib" /usr/bin/tmux \
 && /usr/bin/tmux -V | awk '{ split($2, v, "."); if (v[1] < 3 || (v[1] == 3 && v[2] + 0 < 7)) { print "tmux " $2 " is older than 3.7"; exit 1 } print }' \
 && cd / && rm -rf /tmp/tmux-debs /etc/apt/sources.list.d/tmux-from-sid.list /etc/apt/preferences.d/tmux-from-sid \
 && apt-get purge -y patchelf && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 tether && useradd --uid 1000 --gid 1000 --home-dir /home/tether --shell /bin/bash tether
ENV LANG=en_US.UTF-8 TERM=xterm-256color

# The session image: the agent, tmux and the shells users ask for. The operator mounts writable
# emptyDirs for the home directory and /tmp, so the root file system stays read-only.
FROM ${SESSION_SYSTEM} AS session
COPY --from=binaries /out/tether-session-agent /usr/local/bin/tether-session-agent
USER 1000:1000
WORKDIR /home/tether
EXPOSE 7681
ENTRYPOINT ["/usr/local/bin/tether-session-agent"]
