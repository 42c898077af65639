import numpy as np
import pytest
import torch

from shadowserve.config import CodecConfig
from shadowserve.errors import ChunkFormatError, ConfigError, ShadowServeError
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache.lossless import LOSSLESS_STAGES, make_stage
from tests.kvcache.conftest import FINGERPRINT, SHAPE, make_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOSSY = [
    CodecConfig(),
    CodecConfig(quant="rms", key_step=0.3, value_step=2.0, lossless="deflate"),
    CodecConfig(quant="cachegen", lossless="deflate"),
    CodecConfig(quant="uniform", bins=5, lossless="lz4"),
    CodecConfig(quant="int8", lossless="none"),
    CodecConfig(quant="kivi", bins=16, lossless="zstd"),
    CodecConfig(layer_steps="0.5,1,2,1"),
]


@pytest.mark.parametrize("stage", LOSSLESS_STAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_modes_are_bit_exact(stage, dtype):
    codec = KVCodec(CodecConfig(quant="none", lossless=stage), FINGERPRINT)
    kv = make_kv(dtype=dtype)
    kv[0, 0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-30]).to(dtype)
    out = torch.empty_like(kv)
    codec.decode(codec.encode(kv), out)
    assert torch.equal(out.view(torch.uint8), kv.contiguous().view(torch.uint8))


@pytest.mark.parametrize("config", LOSSY, ids=lambda c: f"{c.quant}-{c.lossless}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_lossy_modes_stay_within_the_quantization_bound(config, dtype):
    codec = KVCodec(config, FINGERPRINT)
    kv = make_kv(dtype=dtype, seed=1)
    blob = codec.encode(kv)
    staging = np.empty(codec.max_staging_nbytes(SHAPE), np.uint8)
    header = codec.decompress_into(blob, staging)
    assert header.shape == SHAPE and header.dtype == dtype
    assert header.payload_nbytes < len(blob)
    for out_dtype in (dtype, torch.float32):
        out = torch.empty(SHAPE, dtype=out_dtype)
        codec.dequantize_into(header, staging, out)
        bound = codec.error_bound(header, staging).view(SHAPE)
        err = (out.double() - kv.double()).abs()
        # Output rounding: half an ulp of the output dtype at the value's magnitude.
        slack = out.double().abs() * torch.finfo(out_dtype).eps
        for layer in range(SHAPE[0]):
            assert bool((err[layer] <= bound[layer] * (1 + 1e-6) + slack[layer]).all()), f"layer {layer}"
        # The check can fail: one value off by 0.6 of a step is caught.
        bad = out.double().clone()
        bad[2, 1, 7, 0, 5] = kv[2, 1, 7, 0, 5].double() + 1.2 * bound[2, 1, 7, 0, 5] + 2 * slack[2, 1, 7, 0, 5]
        assert not bool(((bad - kv.double()).abs() <= bound + slack).all())


def _round_trip(config: CodecConfig, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Decoded KV and the encoded chunk's size."""
    codec = KVCodec(config, FINGERPRINT)
    blob = codec.encode(kv)
    out = torch.empty_like(kv)
    codec.decode(blob, out)
    return out, len(blob)


def test_lossy_quality_ordering():
    kv = make_kv(seed=2)

    def rel_err(config):
        out, _ = _round_trip(config, kv)
        return ((out - kv).norm() / kv.norm()).item()

    assert rel_err(CodecConfig(quant="int8")) < rel_err(CodecConfig(quant="uniform", bins=16)) < 0.2
    assert rel_err(CodecConfig(quant="rms", key_step=0.1, value_step=0.1)) < rel_err(CodecConfig())


def test_decode_reuses_caller_buffers():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    staging = np.empty(codec.max_staging_nbytes(SHAPE), np.uint8)
    out = torch.empty(SHAPE, dtype=torch.float16)
    ptr, sptr = out.data_ptr(), staging.ctypes.data
    results = []
    for seed in range(3):
        kv = make_kv(dtype=torch.float16, seed=seed)
        header = codec.decompress_into(codec.encode(kv), staging)
        got = codec.dequantize_into(header, staging, out)
        assert got is out and out.data_ptr() == ptr and staging.ctypes.data == sptr
        results.append(out.clone())
        assert (out.float() - kv.float()).abs().max() < kv.float().abs().max() * 0.2
    assert not torch.equal(results[0], results[1])
    # decode() also accepts a memoryview over shared memory-like buffers and bytearrays
    blob = bytearray(codec.encode(make_kv(dtype=torch.float16)))
    codec.decode(memoryview(blob), out)


def test_wrong_destination_is_a_clear_error():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    blob = codec.encode(make_kv())
    staging = np.empty(codec.max_staging_nbytes(SHAPE), np.uint8)
    header = codec.decompress_into(blob, staging)
    wrong = torch.empty(4, 2, 16, 2, 16)
    with pytest.raises(ChunkFormatError, match="shape"):
        codec.dequantize_into(header, staging, wrong)
    with pytest.raises(ChunkFormatError, match="shape"):
        codec.decode(blob, wrong)
    with pytest.raises(ValueError, match="floating"):
        codec.dequantize_into(header, staging, torch.empty(SHAPE, dtype=torch.int32))
    with pytest.raises(ValueError, match="staging"):
        codec.decompress_into(blob, np.empty(16, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        codec.decompress_into(blob, bytes(header.staging_nbytes))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(torch.zeros(4, 3, 8, 2, 16))


def test_staging_sizes_and_ids():
    for config in LOSSY + [CodecConfig(quant="none")]:
        codec = KVCodec(config, FINGERPRINT)
        for dtype in DTYPES:
            assert codec.staging_nbytes(SHAPE, dtype) <= codec.max_staging_nbytes(SHAPE)
            assert len(codec.encode(make_kv(dtype=dtype))) <= codec.max_encoded_nbytes(SHAPE)
    ids = {KVCodec(c, FINGERPRINT).codec_id for c in LOSSY}
    assert len(ids) == len(LOSSY)
    # The compression level does not change decoded bytes, so it does not change the id.
    assert KVCodec(CodecConfig(level=9), "m").codec_id == KVCodec(CodecConfig(level=3), "m").codec_id
    assert "rms" in KVCodec(CodecConfig(), "m").codec_id


def test_non_finite_input_is_refused_by_lossy_codecs():
    kv = make_kv()
    kv[1, 0, 3, 0, 0] = float("nan")
    with pytest.raises(ShadowServeError):
        KVCodec(CodecConfig(), FINGERPRINT).encode(kv)


def test_all_zero_chunk_round_trips():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    out = torch.ones(SHAPE)
    codec.decode(codec.encode(torch.zeros(SHAPE)), out)
    assert torch.equal(out, torch.zeros(SHAPE))


def test_config_validation():
    for bad in (dict(quant="fp4"), dict(lossless="brotli"), dict(bins=2), dict(bins=300), dict(key_step=0),
                dict(lossless="deflate", level=13), dict(lossless="zstd", level=99), dict(pack_nibbles="false")):
        with pytest.raises(ConfigError):
            CodecConfig(**bad)


@pytest.mark.parametrize("stage", LOSSLESS_STAGES)
def test_lossless_stages_reject_wrong_sizes(stage):
    st = make_stage(stage)
    data = np.arange(5000, dtype=np.uint8)
    packed = st.compress(data)
    dst = np.empty(5000, np.uint8)
    st.decompress_into(packed, dst)
    assert np.array_equal(dst, data)
    with pytest.raises(ChunkFormatError):
        st.decompress_into(packed, np.empty(4999, np.uint8))
    with pytest.raises(ChunkFormatError):
        st.decompress_into(packed, np.empty(5001, np.uint8))


def test_native_entry_points_are_found():
    # The zero-copy path needs the C symbols; the fallback works but allocates per chunk.
    for stage in ("deflate", "zstd", "lz4"):
        assert make_stage(stage).native, stage


def test_threads_decode_concurrently():
    from concurrent.futures import ThreadPoolExecutor

    codec = KVCodec(CodecConfig(), FINGERPRINT)
    kvs = [make_kv(seed=s) for s in range(8)]
    blobs = [codec.encode(k) for k in kvs]
    expect = []
    for b in blobs:
        o = torch.empty(SHAPE)
        expect.append(codec.decode(b, o))

    def work(i):
        out = torch.empty(SHAPE)
        for _ in range(5):
            codec.decode(blobs[i], out)
        return torch.equal(out, expect[i])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def test_layer_steps_scale_each_layers_precision():
    kv = make_kv(seed=3)

    def layer_errors(config):
        out, size = _round_trip(config, kv)
        return [((out[i] - kv[i]).norm() / kv[i].norm()).item() for i in range(SHAPE[0])], size

    uniform, uniform_size = layer_errors(CodecConfig())
    scheduled, scheduled_size = layer_errors(CodecConfig(layer_steps="0.25,1,4,1"))
    assert scheduled[0] < 0.5 * uniform[0]  # finer steps in layer 0
    assert scheduled[2] > 1.5 * uniform[2]  # coarser in layer 2
    assert scheduled[1] == uniform[1] and scheduled[3] == uniform[3]  # the others untouched
    assert scheduled_size != uniform_size
    # the schedule is part of the codec's identity, so differently coded chunks never share keys
    ids = {KVCodec(CodecConfig(layer_steps=x), "m").codec_id for x in ("", "0.25,1,4,1", "0.25,1,4,2")}
    assert len(ids) == 3
    assert KVCodec(CodecConfig(layer_steps="1,1,1,1"), "m").codec_id != KVCodec(CodecConfig(), "m").codec_id


def test_layer_steps_errors():
    with pytest.raises(ConfigError, match="rms"):
        CodecConfig(quant="int8", layer_steps="1,1")
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        CodecConfig(layer_steps="1,fine")
    with pytest.raises(ConfigError, match=r"\[0.05, 20\]"):
        CodecConfig(layer_steps="1,0")
    codec = KVCodec(CodecConfig(layer_steps="1,1,1"), FINGERPRINT)  # 3 multipliers, 4 layers
    with pytest.raises(ConfigError, match="3 multipliers but the model has 4 layers"):
        codec.encode(make_kv())
