"""ComplexLM: causality, imaginary parts that survive bf16 casts and autocast, aux terms, training, config."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.linear import zero3_linear_wrap
from torch import nn

from model.complex import (
    ComplexArgs,
    ComplexLM,
    ModReLU,
    aux_terms,
    coherence_term,
    complex_parameters,
    energy_term,
)

VOCAB = 61


def small_args(**overrides: object) -> ComplexArgs:
    base = ComplexArgs(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.1)
    return dataclasses.replace(base, **overrides)


def build(seed: int = 0, **overrides: object) -> ComplexLM:
    torch.manual_seed(seed)
    return ComplexLM(small_args(**overrides)).eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def block_outputs(model: ComplexLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Run `model(input_ids)` and return what each block returned."""
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in model.layers]
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def test_changing_a_future_token_never_changes_earlier_logits() -> None:
    model = build()
    ids = tokens(length=16)
    logits = model(ids)  # (B, T, V)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32
    for j in (0, 7, 15):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1) % VOCAB
        new_logits = model(changed)
        torch.testing.assert_close(new_logits[:, :j], logits[:, :j], atol=0.0, rtol=0.0)
        assert not torch.allclose(new_logits[:, j], logits[:, j])


def test_logits_depend_on_the_order_of_earlier_tokens() -> None:
    # With one block, the last position sees its prefix only through attention, which without the
    # positional phases would treat it as an unordered set.
    model = build(n_layers=1)
    ids = tokens(length=8)
    swapped = ids.clone()
    swapped[:, [1, 4]] = ids[:, [4, 1]]
    assert not torch.allclose(model(swapped)[:, -1], model(ids)[:, -1], atol=1e-4)


def test_complex_parameters_have_imaginary_parts_and_receive_gradients() -> None:
    model = build().train()
    views = complex_parameters(model)
    tagged = {name for name, p in model.named_parameters() if getattr(p, "complex_view", False)}
    assert set(views) == tagged
    assert len(views) == 2 * 4 * model.args.n_layers  # weight + bias of qkv, o_proj, up, down per block
    for name, view in views.items():
        assert view.dtype == torch.complex64, name
        assert (view.imag != 0).all(), f"{name} has zero imaginary entries after init"

    ids = tokens()
    logits, aux = model(ids[:, :-1], return_aux=True)
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux["energy"] + aux["coherence"]
    loss.backward()
    params = dict(model.named_parameters())
    for name in views:
        grad = params[name].grad
        assert grad is not None and grad.shape[-1] == 2, name
        assert grad[..., 1].abs().sum() > 0, f"no gradient reaches the imaginary part of {name}"
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_gradients_are_unchanged_when_zero3_replaces_torch_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    # ZeRO-3 swaps torch.nn.functional.linear for its own autograd function, for the rest of the process;
    # its backward does not conjugate, which is wrong for complex inputs. The complex path must not use it.
    def grads() -> dict[str, torch.Tensor]:
        model = build().train()
        ids = tokens()
        logits, aux = model(ids[:, :-1], return_aux=True)
        (F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux["energy"]).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    reference = grads()
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    for name, grad in grads().items():
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_parameter_is_complex_and_state_dict_round_trip_is_exact() -> None:
    model = build()
    assert not any(p.is_complex() for p in model.parameters())
    assert not any(b.is_complex() for b in model.buffers())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(seed=123)
    fresh.load_state_dict(torch.load(buffer))
    ids = tokens()
    torch.testing.assert_close(fresh(ids), model(ids), atol=0.0, rtol=0.0)


def test_torch_drops_the_imaginary_part_of_a_complex_parameter_cast_to_bf16() -> None:
    # Why complex parameters are stored as real (..., 2) tensors: this is what a bf16 cast does to them.
    module = nn.Module()
    module.w = nn.Parameter(torch.tensor([1.0 + 2.0j, -3.0 + 0.5j]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Casting complex values to real discards the imaginary part"
        module.to(torch.bfloat16)
    assert module.w.dtype == torch.bfloat16
    torch.testing.assert_close(module.w.float(), torch.tensor([1.0, -3.0]))


def test_bf16_model_keeps_imaginary_parts_and_computes_in_complex64() -> None:
    model = build()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())  # an fp32 model holding the bf16 values
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name, view in complex_parameters(model).items():
        assert view.dtype == torch.complex64 and (view.imag != 0).all(), name

    ids = tokens()
    outputs = block_outputs(model, ids)
    assert len(outputs) == model.args.n_layers
    for out in outputs:
        assert out.dtype == torch.complex64 and out.imag.abs().min() > 0
    # The complex path upcasts every weight it reads, so it matches the fp32 model bit for bit.
    torch.testing.assert_close(model.hidden(ids), rounded.hidden(ids), atol=0.0, rtol=0.0)
    logits = model(ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_autocast_leaves_the_complex_path_alone() -> None:
    model = build()
    ids = tokens()
    reference = model.hidden(ids)  # (B, T, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = block_outputs(model, ids)
        hidden = model.hidden(ids)
        logits, aux = model(ids, return_aux=True)
    for out in outputs:
        assert out.dtype == torch.complex64 and out.imag.abs().min() > 0
    torch.testing.assert_close(hidden, reference, atol=0.0, rtol=0.0)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model(ids), atol=0.05, rtol=0.05)  # only the head ran in bf16
    assert all(t.dtype == torch.float32 and t.dim() == 0 for t in aux.values())


def test_meta_build_then_init_weights_is_deterministic_and_retags() -> None:
    def materialise(seed: int) -> ComplexLM:
        with torch.device("meta"):
            lazy = ComplexLM(small_args())
        lazy.to_empty(device="cpu")
        torch.manual_seed(seed)
        lazy.init_weights()
        return lazy

    first, other = materialise(5), materialise(6)
    eager = build(seed=123)  # init_weights must overwrite every parameter of an eager build too
    torch.manual_seed(5)
    eager.init_weights()
    for name, value in first.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[name], atol=0.0, rtol=0.0, msg=name)
        constant = name.endswith(("norm.weight", "act.bias"))  # ones and zeros whatever the seed
        assert constant or not torch.equal(value, other.state_dict()[name]), name
    tagged = {name for name, p in first.named_parameters() if getattr(p, "complex_view", False)}
    assert tagged == set(complex_parameters(first))  # to_empty dropped the tags; init_weights restored them


def test_adamw_lowers_the_loss_on_a_repeated_sequence() -> None:
    model = build().train()
    ids = tokens(batch=2, length=6).repeat(1, 4)  # (2, 24): a 6-token pattern, four times
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits, aux = model(ids[:, :-1], return_aux=True)
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        for name, term in aux.items():
            assert term.dim() == 0 and torch.isfinite(term), name
        loss = ce + 0.1 * aux["energy"] + 0.1 * aux["coherence"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(ce.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_energy_term_on_hand_checked_values() -> None:
    assert energy_term(torch.ones(2, 3, 4, dtype=torch.complex64)).item() == 0.0
    assert energy_term(torch.full((1, 2, 2), 2.0 + 0.0j)).item() == pytest.approx(9.0)  # (4 - 1)^2
    z = torch.tensor([[[1.0 + 0.0j], [0.5j]]])  # (1, 2, 1): powers 1 and 0.25
    assert energy_term(z).item() == pytest.approx((0.0 + 0.75**2) / 2)
    z = torch.tensor([[[1.0 + 1.0j]]])  # |z|^2 = 2
    assert energy_term(z).item() == pytest.approx(1.0)


def test_coherence_term_on_hand_checked_values() -> None:
    same_phase = torch.tensor([1.0, 2.0, 3.0])[None, :, None] * torch.polar(torch.tensor(1.0), torch.tensor(0.7))
    assert coherence_term(same_phase).item() == pytest.approx(0.0, abs=1e-6)  # amplitudes do not matter
    opposite = torch.tensor([[[1.0 + 0j], [-1.0], [1.0], [-1.0]]])  # (1, 4, 1): phases cancel
    assert coherence_term(opposite).item() == pytest.approx(1.0)
    quarter = torch.tensor([[[1.0 + 0j], [1.0j]]])  # mean (1 + i) / 2
    assert coherence_term(quarter).item() == pytest.approx(1 - 1 / math.sqrt(2))
    two_channels = torch.tensor([[[1.0 + 0j, 1.0], [1.0, -1.0]]])  # channel 0 coherent, channel 1 not
    assert coherence_term(two_channels).item() == pytest.approx(0.5)
    with_zero = torch.tensor([[[0.0 + 0j], [3.0j]]], requires_grad=True)  # the zero counts as a zero phasor
    term = coherence_term(with_zero)
    assert term.item() == pytest.approx(0.5)
    term.backward()
    assert torch.isfinite(torch.view_as_real(with_zero.grad)).all()
    assert set(aux_terms(quarter)) == {"energy", "coherence"}


def test_modrelu_gates_amplitude_keeps_phase_and_is_safe_at_zero() -> None:
    act = ModReLU(3, eps=1e-6)
    with torch.no_grad():
        act.bias.copy_(torch.tensor([-1.0, -1.0, -1.0]))
    z = torch.tensor([3.0 * torch.polar(torch.tensor(1.0), torch.tensor(0.4)).item(), 0.5j, 0.0],
                     requires_grad=True)
    out = act(z)
    torch.testing.assert_close(out[0], 2.0 * torch.polar(torch.tensor(1.0), torch.tensor(0.4)))  # |z| 3 -> 2
    assert out[1] == 0 and out[2] == 0
    torch.view_as_real(out).sum().backward()
    assert torch.isfinite(torch.view_as_real(z.grad)).all()


@pytest.mark.parametrize(
    ("field", "value"),
    [("dim", 30), ("vocab_size", 0), ("n_layers", -1), ("n_heads", 0), ("max_seq_len", 0),
     ("ffn_mult", 1.5), ("norm_eps", 0.0), ("init_std", -0.1), ("phase_theta", 0.0)],
)
def test_bad_args_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"ComplexArgs\.{field}={value!r}"):
        ComplexLM(small_args(**{field: value}))


def test_sequence_longer_than_max_seq_len_is_refused() -> None:
    model = build(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(tokens(length=9))
