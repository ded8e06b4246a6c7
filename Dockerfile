# syntax=docker/dockerfile:1
# tokenbroker: build in the Rust image, run from a small Debian image as an
# unprivileged user (uid/gid 10001, as the Kubernetes manifests expect).
#
#   docker build -t tokenbroker .
#   docker run --rm -v /run/tokenbroker:/run/tokenbroker tokenbroker serve --emulator

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin tokenbroker \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin tokenbroker \
    && strip target/release/tokenbroker

FROM debian:bookworm-slim AS runtime
RUN groupadd --system --gid 10001 tokenbroker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tokenbroker \
    && install -d -o 10001 -g 10001 -m 0755 /run/tokenbroker
COPY --from=build /src/target/release/tokenbroker /usr/local/bin/tokenbroker
USER 10001:10001
ENV TOKENBROKER_SOCKET=/run/tokenbroker/tokenbroker.sock
ENTRYPOINT ["/usr/local/bin/tokenbroker"]
CMD ["serve"]
