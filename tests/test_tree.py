import pytest
import torch

import bilevel as bl
from bilevel._tree import (Flat, tree_add, tree_axpy, tree_check_like, tree_norm, tree_scale, tree_sub,
                           tree_vdot, tree_zeros_like)


def _tree(dtype=torch.float64):
    return {"a": torch.randn(3, 4, dtype=dtype), "b": torch.randn(5, dtype=dtype), "c": torch.randn((), dtype=dtype)}


def _vec(t):
    return torch.cat([v.reshape(-1) for v in t.values()])


def test_arithmetic_matches_flat_vectors():
    x, y = _tree(), _tree()
    assert torch.allclose(_vec(tree_add(x, y)), _vec(x) + _vec(y))
    assert torch.allclose(_vec(tree_sub(x, y)), _vec(x) - _vec(y))
    assert torch.allclose(_vec(tree_scale(2.5, x)), 2.5 * _vec(x))
    assert torch.allclose(_vec(tree_axpy(-0.3, x, y)), -0.3 * _vec(x) + _vec(y))
    assert torch.allclose(tree_vdot(x, y), _vec(x) @ _vec(y))
    assert torch.allclose(tree_norm(x), _vec(x).norm())
    z = tree_zeros_like(x)
    assert all((v == 0).all() and v.shape == x[k].shape for k, v in z.items())


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
        tree_check_like(x, {"a": x["a"], "b": x["b"]})
    with pytest.raises(bl.ShapeError, match=r"shape \(5,\)"):
        tree_check_like(x, {**x, "b": torch.zeros(6)})
