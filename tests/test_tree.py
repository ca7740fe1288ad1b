import pytest
import torch

import bilevel as bl
from bilevel._errors import check_like
from bilevel._tree import Flat, tree_detach, tree_norm


def _tree(dtype=torch.float64):
    return {"a": torch.randn(3, 4, dtype=dtype), "b": torch.randn(5, dtype=dtype), "c": torch.randn((), dtype=dtype)}


def _vec(t):
    return torch.cat([v.reshape(-1) for v in t.values()])


def test_norm_and_detach_match_flat_vectors():
    x = {k: v.requires_grad_() for k, v in _tree().items()}
    assert torch.allclose(tree_norm(x), _vec(x).norm(), rtol=1e-12, atol=0)
    d = tree_detach(x, requires_grad=True)
    assert all(d[k].requires_grad and d[k].grad_fn is None and d[k].data_ptr() == x[k].data_ptr() for k in x)
    with pytest.raises(bl.ShapeError, match="tree_norm.*empty"):
        tree_norm({})


def test_flat_roundtrip_and_views():
    x = _tree()
    fl = Flat(x)
    vec = fl.flatten(x)
    assert vec.shape == (12 + 5 + 1,)
    assert torch.equal(vec, _vec(x))
    back = fl.unflatten(vec)
    assert all(torch.equal(back[k], x[k]) for k in x)
    back["b"].zero_()  # views write through
    assert (vec[12:17] == 0).all()
    assert torch.equal(fl.flatten_list([None, x["b"], x["c"]])[:12], torch.zeros(12, dtype=torch.float64))


def test_as_flat_is_a_view_of_one_buffer_else_a_copy():
    x = _tree()
    fl = Flat(x)
    vec = fl.flatten(x)
    same = fl.as_flat(fl.unflatten(vec))
    assert same.data_ptr() == vec.data_ptr() and same.shape == vec.shape
    assert torch.equal(fl.as_flat(x), vec) and fl.as_flat(x).data_ptr() != vec.data_ptr()   # separate leaves
    shifted = fl.unflatten(torch.cat([vec[:1], vec])[1:])                                    # a buffer with an offset
    assert fl.as_flat(shifted).data_ptr() == shifted["a"].data_ptr()
    swapped = dict(reversed(list(fl.unflatten(vec.clone()).items())))                       # other key order
    assert torch.equal(fl.as_flat(swapped), vec)
    wrong = {k: v for k, v in fl.unflatten(vec.clone()).items()}
    wrong["b"] = wrong["b"].flip(0)                                                         # not in the buffer
    assert torch.equal(fl.as_flat(wrong)[12:17], vec[12:17].flip(0))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_addcmul_list_is_the_flattened_leaves_plus_a_diagonal_product(out_dtype):
    """``addcmul_list(leaves, d, v, out)`` writes ``flatten_list(leaves) + d ⊙ v`` into ``out``
    (bitwise the copy-then-update it replaces), zero leaves included, into a buffer of another dtype."""
    gen = torch.Generator().manual_seed(0)
    tree = {"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.zeros(2, 2)}
    fl = Flat(tree)
    leaves = [torch.randn(3, 4, generator=gen), None, torch.randn(2, 2, generator=gen)]
    d, v = torch.rand(fl.size, generator=gen), torch.randn(fl.size, generator=gen)
    out = torch.full((fl.size,), float("nan"), dtype=out_dtype)
    got = fl.addcmul_list(leaves, d, v, out)
    expected = fl.flatten_list(leaves, torch.empty(fl.size, dtype=out_dtype)).addcmul_(d.to(out_dtype), v.to(out_dtype))
    assert got is out and torch.equal(got, expected)
    assert torch.equal(fl.addcmul_list(leaves, d, v), fl.flatten_list(leaves).addcmul_(d, v))     # a fresh buffer


def test_flat_rejects_mixed_dtype_and_bad_vectors():
    with pytest.raises(bl.ShapeError, match="share dtype"):
        Flat({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(bl.ShapeError, match="empty"):
        Flat({})
    with pytest.raises(bl.ShapeError, match=r"shape \(4,\)"):
        Flat({"a": torch.zeros(4)}).unflatten(torch.zeros(3))


def test_check_like_messages():
    x = _tree()
    with pytest.raises(bl.ShapeError, match=r"missing from `b`: \['c'\]"):
        check_like(x, {"a": x["a"], "b": x["b"]}, "f", "a", "b")
    with pytest.raises(bl.ShapeError, match=r"shape \(5,\)"):
        check_like(x, {**x, "b": torch.zeros(6)}, "f", "a", "b")
