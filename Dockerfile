# esft-serve with the demo model and its adapters; the trainer binary is included too.
#   docker build -t esft .
#   docker run -p 8080:8080 esft
# Mount your own model and adapters to serve something else:
#   docker run -p 8080:8080 -v /models/x:/srv/model -v /srv/adapters:/srv/adapters \
#     esft esft-serve serve --host 0.0.0.0 --model /srv/model --adapters /srv/adapters
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY trainer trainer
COPY benches benches
COPY tests tests
RUN cargo build --release --workspace --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /srv
COPY --from=build /src/target/release/esft-serve /src/target/release/esft-train /usr/local/bin/
COPY config config
COPY models models
COPY adapters adapters
EXPOSE 8080
# Serves models/demo with the adapters in adapters/ (the built-in defaults).
CMD ["esft-serve", "serve", "--host", "0.0.0.0"]
