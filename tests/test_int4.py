"""The int4 CPU fast path: exact recovery of 4-bit grouped weights, and a working model."""

import copy

import pytest
import torch
from torch import nn

from safesteer import SteeringSpec, generate, load_model
from safesteer.activations import record_activations
from safesteer.int4 import GROUP_SIZE, Int4Linear, Int8Linear, _pack_codes, int4_problem, quantize_int4
from safesteer.models import available_precision, generation_precision
from tests.conftest import HARMFUL, SAFE

pytestmark = pytest.mark.skipif(int4_problem() is not None, reason=f"int4 kernel unavailable: {int4_problem()}")


def _q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight on a GGUF Q4_1 grid (per group of 32: q * d + m, d and m stored as float16)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP_SIZE
    codes = torch.randint(0, 16, (out_features, groups, GROUP_SIZE), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # llama.cpp's quantizer maps each group's min to 0 and max to 15
    d = (torch.rand(out_features, groups, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(out_features, groups, 1, generator=g) * 0.1).half().float()
    return (codes * d + m).reshape(out_features, in_features), codes.reshape(out_features, in_features)


def test_q4_1_codes_are_recovered_exactly():
    weight, codes = _q4_1_weight(48, 96)
    recovered, scales_and_zeros = _pack_codes(weight, GROUP_SIZE)
    assert torch.equal(recovered, codes.to(torch.int32))
    scale, zero = scales_and_zeros[..., 0].T, scales_and_zeros[..., 1].T  # [out, groups]
    rebuilt = ((recovered.reshape(48, 3, GROUP_SIZE) - 8) * scale[..., None] + zero[..., None]).reshape(48, 96)
    assert torch.allclose(rebuilt, weight, atol=1e-6)


def _linear_on_grid(out_features: int, in_features: int, seed: int, bias: bool) -> tuple[nn.Linear, torch.Tensor]:
    """A float linear layer whose weight is on the Q4_1 grid, and that weight."""
    weight, _ = _q4_1_weight(out_features, in_features, seed=seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear, weight


def test_int4_linear_matches_its_dequantized_weights():
    linear, _ = _linear_on_grid(64, 128, seed=1, bias=True)
    packed = Int4Linear.from_linear(linear)
    x = torch.randn(5, 128)
    expected = linear(x)
    got = packed(x)
    assert got.dtype == x.dtype and got.shape == expected.shape
    # bfloat16 activations and group scales: agreement to bfloat16 precision, not bit for bit
    assert torch.allclose(got, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_int8_head_is_close_to_the_float_head():
    head = nn.Linear(64, 512, bias=False)
    x = torch.randn(3, 64)
    assert torch.allclose(Int8Linear(head)(x), head(x), atol=0.05 * head(x).abs().max().item())


def test_only_shapes_the_kernel_takes_are_packed():
    assert Int4Linear.fits(nn.Linear(64, 32))
    assert not Int4Linear.fits(nn.Linear(48, 32))  # input not whole groups of 32
    assert not Int4Linear.fits(nn.Linear(64, 40))  # outputs not a multiple of 16


@pytest.fixture(scope="module")
def tiny_int4(tiny_folder):
    return load_model(str(tiny_folder), "int4", device="cpu")


def test_loaded_int4_model_is_packed(tiny_int4):
    assert tiny_int4.identity.precision == "int4"
    packed = [m for m in tiny_int4.model.modules() if isinstance(m, Int4Linear)]
    assert len(packed) == 7 * tiny_int4.architecture.n_layers
    assert isinstance(tiny_int4.model.get_output_embeddings(), Int8Linear)


def _snap_to_q4_grid(model: nn.Module) -> None:
    """Round every packable weight to its 4-bit group grid, as a GGUF Q4_1 checkpoint already is."""
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and Int4Linear.fits(module) and module is not model.lm_head:
                out_features, in_features = module.weight.shape
                codes, sz = _pack_codes(module.weight, GROUP_SIZE)
                grouped = (codes.reshape(out_features, -1, GROUP_SIZE) - 8) * sz[..., 0].T[..., None]
                module.weight.copy_((grouped + sz[..., 1].T[..., None]).reshape(out_features, in_features))


def test_on_4bit_weights_int4_records_what_float32_records(tiny_folder):
    """On weights already on a 4-bit grid (the embedded model's case) only bfloat16 rounding differs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safesteer.models import wrap_model

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_folder))
    exact = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32)
    _snap_to_q4_grid(exact)
    fast = copy.deepcopy(exact)
    quantize_int4(fast)
    prompts = HARMFUL[:4] + SAFE[:4]
    got = record_activations(wrap_model(fast, tokenizer, "tiny", "int4"), prompts).float()
    want = record_activations(wrap_model(exact, tokenizer, "tiny", "fp32"), prompts).float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=1)
    assert cosine.min() > 0.99


def test_int4_generation_steers_and_strength_zero_is_plain(tiny_int4):
    vector = torch.randn(tiny_int4.identity.hidden_size, generator=torch.Generator().manual_seed(3)) * 4
    plain = generate(tiny_int4, [HARMFUL[0]], max_new_tokens=12)
    zero, steered = generate(tiny_int4, [HARMFUL[0]] * 2, [SteeringSpec(vector, 1, (0.0, 4.0))], max_new_tokens=12)
    assert zero == plain[0]
    assert steered != plain[0]


def test_quantize_int4_reports_swapped_layers(tiny_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32)
    assert quantize_int4(model) == 7 * model.config.num_hidden_layers
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_int4_is_a_cpu_path_and_the_fast_choice_for_nf4_on_cpu():
    assert available_precision("int4", "cuda") != "int4"
    assert available_precision("int4", "cpu") == "int4"
    assert generation_precision("nf4", "cpu") == "int4"
    assert generation_precision("nf4", "cuda") == "nf4"
    assert generation_precision("fp32", "cpu") == "fp32"


@pytest.mark.parametrize("decoder", ["lean", "transformers"])
def test_a_rows_answer_does_not_depend_on_its_batch(tiny_int4, decoder):
    """Alone, beside one neighbour, or among many longer prompts: the same tokens."""
    prompt = HARMFUL[0]
    alone = generate(tiny_int4, [prompt], max_new_tokens=16, fixed_length=True, decoder=decoder)[0]
    pair = generate(tiny_int4, [prompt, SAFE[1]], max_new_tokens=16, fixed_length=True, decoder=decoder)
    crowd = [prompt, *(f"{p} Please answer at length, with examples." for p in HARMFUL + SAFE)] * 3
    many = generate(tiny_int4, crowd, max_new_tokens=16, fixed_length=True, decoder=decoder)
    assert pair[0] == alone
    assert all(answer == alone for answer in many[:: len(crowd) // 3])


def test_a_prompts_logits_are_bit_identical_alone_and_in_a_batch_of_copies(tmp_path_factory):
    """The preview's naive and steered rows, and a sweep's cells, share a prompt: exact, not just the argmax.

    24 copies put 24 x the prompt's tokens through every product of the prompt pass, far past the
    64 rows from which a float32 GEMM path with another reduction order once took over. The model
    is wider than the other tests' (256), so rounding differences would reach the logits.
    """
    from tests.tiny import build_tiny_model

    lm = load_model(str(build_tiny_model(tmp_path_factory.mktemp("wide"), hidden_size=256, n_layers=2)), "int4")
    prompt = HARMFUL[0]

    def last_logits(prompts):
        with torch.inference_mode():
            return lm.model(**lm.encode(prompts)).logits[:, -1]

    alone, copies = last_logits([prompt]), last_logits([prompt] * 24)
    assert all(torch.equal(row, alone[0]) for row in copies)


def test_prompt_passes_read_bfloat16_copies_of_the_decoded_weights_and_steps_the_4bit_kernel():
    """Several tokens per row take the bfloat16 GEMM (compute bound); one token per row the 4-bit kernel."""
    from safesteer.int4 import keep_prompt_weights, rows_computed_alone

    linear, weight = _linear_on_grid(64, 128, seed=2, bias=False)
    layer = Int4Linear.from_linear(linear)
    model = nn.Sequential(layer)
    if not rows_computed_alone(128, 64):
        assert keep_prompt_weights(model) == 0 and layer.prompt_weight is None
        pytest.skip("this machine's bfloat16 GEMM does not compute rows alone: prompts keep the 4-bit kernel")
    assert keep_prompt_weights(model, budget=0) == 0 and layer.prompt_weight is None  # over budget: none kept
    assert keep_prompt_weights(model) == 1
    # the kernel's own decoding, rounded once to bfloat16
    kept = layer.prompt_weight.dense()
    assert torch.equal(kept, layer.matmul(torch.eye(128, dtype=torch.bfloat16)).t())
    assert torch.allclose(kept.float(), weight, atol=2e-3)
    x = torch.randn(3, 5, 128).to(torch.bfloat16)
    assert torch.equal(layer(x), layer.prompt_weight.product(x.reshape(-1, 128)).reshape(3, 5, 64))
    assert torch.allclose(layer(x).float(), (x.reshape(-1, 128) @ kept.t()).reshape(3, 5, 64).float(), atol=1e-2)
    step = x[:, :1]
    assert torch.equal(layer(step), layer.matmul(step.reshape(-1, 128).contiguous()).reshape(3, 1, 64))
    # a row's bits do not depend on how many rows share the prompt pass
    prompt = x[:1]
    assert torch.equal(layer(torch.cat([prompt, x[1:]]))[:1], layer(prompt))
    copied = copy.deepcopy(model)[0]  # a prepacked weight has no storage: copies re-pack it
    assert torch.equal(copied(x), layer(x))


def test_the_head_computes_every_product_with_its_decoded_weights_and_a_lone_row_as_a_pair():
    """One GEMM for every product of the head, steps and prompts alike; one row gets the bits of any batch."""
    from safesteer.int4 import computed_alone_here, drop_prompt_weights, keep_prompt_weights, rows_computed_alone

    linear, weight = _linear_on_grid(96, 64, seed=3, bias=False)
    head = Int8Linear(linear)
    model = nn.Sequential(head)
    if not rows_computed_alone(64, 96):
        assert keep_prompt_weights(model) == 0 and head.product_weight is None
        pytest.skip("this machine's bfloat16 GEMM does not compute rows alone: the head keeps the int8 kernel")
    assert keep_prompt_weights(model, budget=0) == 0 and head.product_weight is None  # over budget
    assert keep_prompt_weights(model) == 1 and computed_alone_here(model)
    kept = head.product_weight.dense()  # the int8 kernel's own decoding, rounded once to bfloat16
    assert torch.equal(
        kept, torch._weight_int8pack_mm(torch.eye(64, dtype=torch.bfloat16), head.codes, head.scales).t()
    )
    assert torch.allclose(kept.float(), weight, atol=0.01)
    x = torch.randn(40, 64).to(torch.bfloat16)
    together = head.matmul(x)
    assert torch.equal(together, head.product_weight.product(x))
    assert torch.allclose(together.float(), (x @ kept.t()).float(), atol=1e-2)
    for row in (0, 7, 39):  # alone, in pairs and in any batch: the same bits
        assert torch.equal(head.matmul(x[row : row + 1]), together[row : row + 1])
        assert torch.equal(head(x[row : row + 1][None]), together[row : row + 1][None])
    assert torch.equal(copy.deepcopy(model)[0].matmul(x), together)
    assert drop_prompt_weights(model) == 1 and head.product_weight is None
    assert torch.equal(head.matmul(x[:4]), torch._weight_int8pack_mm(x[:4], head.codes, head.scales))


def test_a_loaded_int4_model_keeps_prompt_weights_where_they_are_exact(tiny_int4):
    from safesteer.int4 import rows_computed_alone

    layers = [m for m in tiny_int4.model.modules() if isinstance(m, Int4Linear)]
    exact = all(rows_computed_alone(m.in_features, m.out_features) for m in layers)
    assert all((m.prompt_weight is not None) == exact for m in layers)
    head = tiny_int4.model.get_output_embeddings()
    assert (head.product_weight is not None) == rows_computed_alone(head.in_features, head.out_features)
    names = list(tiny_int4.model.state_dict())
    assert not [n for n in names if "prompt_weight" in n or "product_weight" in n]  # derived, never saved
