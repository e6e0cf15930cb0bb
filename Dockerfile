# Image for docker-compose.yml (not built or run on the development machines, which have no Docker engine).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY agents agents
COPY topics topics
COPY schemas schemas
