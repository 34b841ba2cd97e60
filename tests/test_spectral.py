"""Exact periodic spectra and clipping against the dense operator built from basis vectors."""

from __future__ import annotations

import pytest
import torch
from reference import dense_singular_values, periodic_conv, periodic_matrix

from ttcompress.kernel import Geometry, polyphase_layout, to_polyphase
from ttcompress.spectral import periodic
from ttcompress.spectral.periodic import clip, singular_values

CASES = [
    # (Cout, Cin, k, n, stride, dilation)
    (4, 3, 3, 8, (1, 1), (1, 1)),
    (5, 3, 3, 8, (2, 2), (1, 1)),  # stride 2, Cout < s²Cin
    (3, 6, 3, 6, (2, 2), (1, 1)),  # non-square channels
    (9, 2, 3, 6, (2, 2), (1, 1)),  # Cout > s²Cin
    (4, 2, 5, 4, (1, 1), (1, 1)),  # kernel larger than the input: wraps around
    (2, 3, 7, 4, (2, 2), (1, 1)),  # larger than the input and strided
    (3, 2, 3, 6, (1, 1), (2, 2)),  # dilation
    (3, 4, 1, 6, (2, 2), (1, 1)),  # 1×1 strided (a shortcut)
    (4, 4, 3, 6, (2, 1), (1, 1)),  # anisotropic stride
    (3, 3, 3, 5, (1, 1), (1, 1)),  # odd size: no self-mirrored Nyquist column
]


@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES)
def test_singular_values_match_dense_operator(cout, cin, k, n, stride, dilation):
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    ref = dense_singular_values(periodic_matrix(w, (n, n), stride, dilation))
    got = singular_values(w, (n, n), Geometry(stride, dilation), dtype=torch.float64)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-10 * ref[0], rtol=0)


@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES[:4])
def test_float32_within_1e4_of_sigma_max(cout, cin, k, n, stride, dilation):
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    ref = dense_singular_values(periodic_matrix(w, (n, n), stride, dilation))
    got = singular_values(w.float(), (n, n), Geometry(stride, dilation), dtype=torch.float32).double()
    assert (got - ref).abs().max() <= 1e-4 * ref[0]


def test_chunking_does_not_change_values():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    a = singular_values(w, (8, 8), Geometry((2, 2)), dtype=torch.float64, chunk=1)
    b = singular_values(w, (8, 8), Geometry((2, 2)), dtype=torch.float64, chunk=1000)
    torch.testing.assert_close(a, b)


def test_stride_not_dividing_input_is_an_error():
    with pytest.raises(ValueError, match="divisible"):
        singular_values(torch.randn(2, 2, 3, 3), (7, 7), Geometry((2, 2)))


@pytest.mark.parametrize("accumulate", ["frequency", "offsets"])
@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES)
def test_clip_is_sedghi_projection(cout, cin, k, n, stride, dilation, accumulate):
    """The clipped kernel equals the dense-matrix construction: SVD of the operator, clamp, back to a kernel by
    reading the kernel's own taps off the (block-circulant) clipped operator — whichever way the change is summed
    back to the taps."""
    torch.manual_seed(1)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    bound = 0.5 * float(singular_values(w, (n, n), Geometry(stride, dilation), dtype=torch.float64)[0])
    got = clip(w, (n, n), bound, Geometry(stride, dilation), dtype=torch.float64, accumulate=accumulate)
    assert got.shape == w.shape

    # reference: clamp the dense operator's singular values; the projection onto "periodic strided convs" is then
    # reading back the kernel at the taps: column of input pixel (c, t) for output (o, 0, 0) holds Σ of the taps at t.
    m = periodic_matrix(w, (n, n), stride, dilation)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    clipped = (u * s.clamp(max=bound)) @ vh
    m1, m2 = n // stride[0], n // stride[1]
    rows = clipped.reshape(cout, m1, m2, cin, n, n)[:, 0, 0]  # output pixel (0,0): y = Σ W[a,b] x[d·a, d·b]
    expected = torch.zeros_like(w)
    used = set()
    for a in range(k):
        for b in range(k):
            t = ((dilation[0] * a) % n, (dilation[1] * b) % n)
            if t in used:
                continue  # a tap wrapping onto an earlier one: the operator only sees their sum
            used.add(t)
            expected[:, :, a, b] = rows[:, :, t[0], t[1]]
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_clip_is_exact_when_kernel_covers_the_grid():
    w = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    got = clip(w, (4, 4), 1.0, Geometry(), dtype=torch.float64)
    sv = dense_singular_values(periodic_matrix(got, (4, 4)))
    assert sv[0] <= 1.0 + 1e-9
    # values below the bound are untouched
    orig = dense_singular_values(periodic_matrix(w, (4, 4)))
    torch.testing.assert_close(torch.sort(sv).values[: (orig < 1).sum()], torch.sort(orig).values[: (orig < 1).sum()])


def test_clip_reduces_sigma_max_and_keeps_small_kernels_small():
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    before = singular_values(w, (8, 8), dtype=torch.float64)[0]
    got = clip(w, (8, 8), 1.0, dtype=torch.float64)
    after = singular_values(got, (8, 8), dtype=torch.float64)[0]
    assert after < before / 3
    # a kernel already below the bound is a fixed point
    small = w / (2 * before)
    torch.testing.assert_close(clip(small, (8, 8), 1.0, dtype=torch.float64), small, atol=1e-12, rtol=0)


def test_periodic_reference_is_pytorch_conv_with_circular_padding():
    """Sanity of the brute-force reference itself against torch's own circular conv."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular", bias=False).double()
    conv.weight.data.copy_(w)
    torch.testing.assert_close(periodic_conv(x, w, (2, 2), (1, 1), (1, 1)), conv(x))


# --- the fast paths: distinct frequencies, Gram matrices, precision ladder, chunks, threads ----------------------


def fft_singular_values(w: torch.Tensor, n: int, stride: int = 1) -> torch.Tensor:
    """Independent float64 reference for sizes too large for the dense operator: App. B.1 of the paper
    (full-grid FFT of the zero-padded polyphase kernel, complex128 SVD per frequency)."""
    cout, cin, kh, kw = w.shape
    pad = w.new_zeros(cout, cin, n, n, dtype=torch.float64)
    pad[:, :, :kh, :kw] = w
    m = n // stride
    poly = pad.reshape(cout, cin, m, stride, m, stride).permute(0, 1, 3, 5, 2, 4).reshape(cout, -1, m, m)
    sv = torch.linalg.svdvals(torch.fft.fft2(poly).permute(2, 3, 0, 1)).flatten()
    return torch.sort(sv, descending=True).values


def ill_conditioned(kind: str, cout: int, cin: int, k: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "rank-deficient":  # P̂(f) of rank ≤ r at every frequency: many exact zeros
        r = min(cout, cin) // 2
        return torch.einsum("or,rcij->ocij", torch.randn(cout, r, generator=g, dtype=torch.float64),
                            torch.randn(r, cin, k, k, generator=g, dtype=torch.float64))
    if kind == "graded":  # channel components with scales 1 … 1e-7
        r = min(cout, cin)
        u, _ = torch.linalg.qr(torch.randn(cout, r, generator=g, dtype=torch.float64))
        v = torch.randn(r, cin, k, k, generator=g, dtype=torch.float64)
        return torch.einsum("or,r,rcij->ocij", u, torch.logspace(0, -7, r, dtype=torch.float64), v)
    if kind == "cluster-and-zeros":  # centre tap an orthogonal projection: σ ∈ {1, 0} at every frequency
        q, _ = torch.linalg.qr(torch.randn(cout, cout // 2, generator=g, dtype=torch.float64))
        w = torch.zeros(cout, cout, k, k, dtype=torch.float64)
        w[:, :, k // 2, k // 2] = q @ q.T
        return w
    raise ValueError(kind)


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (6, 5), (1, 4), (2, 2), (1, 1), (3, 1)])
def test_half_grid_holds_each_conjugate_pair_once(grid):
    m1, m2 = grid
    half = periodic.HalfGrid.of(grid)
    seen = set()
    for (f1, f2), w in zip(half.freqs.tolist(), half.weight.tolist()):
        pair = frozenset({(f1, f2), ((-f1) % m1, (-f2) % m2)})
        assert pair not in seen
        seen.add(pair)
        assert w == len(pair)
    everything = {frozenset({(a, b), ((-a) % m1, (-b) % m2)}) for a in range(m1) for b in range(m2)}
    assert seen == everything
    assert int(half.weight.sum()) == m1 * m2


GEOMETRIES = [  # (k, n, stride, dilation)
    (3, 16, (1, 1), (1, 1)), (3, 16, (2, 2), (1, 1)), (1, 8, (2, 2), (1, 1)), (1, 8, (1, 1), (1, 1)),
    (2, 8, (1, 1), (1, 1)), (3, 6, (1, 1), (2, 2)), (5, 4, (1, 1), (1, 1)), (3, 8, (2, 1), (1, 1)), (3, 2, (1, 1), (1, 1)),
]


@pytest.mark.parametrize("k,n,stride,dilation", GEOMETRIES)
@pytest.mark.parametrize("interpolate", [False, True])
def test_gram_terms_are_the_gram_matrices(k, n, stride, dilation, interpolate):
    layout = polyphase_layout((k, k), (n, n), Geometry(stride, dilation))
    taps = to_polyphase(torch.randn(5, 3, k, k, dtype=torch.float64), layout)
    side, _ = periodic._side(taps)
    freqs = periodic.HalfGrid.of(layout.grid).freqs
    terms = periodic.GramTerms.of(side, layout.positions, layout.grid, interpolate=interpolate)
    q = periodic._GramSource(side, layout, len(freqs), 1).transfer(freqs)
    ref = q @ q.mH
    torch.testing.assert_close(terms.chunk(freqs), ref, atol=1e-13 * float(ref.abs().max()), rtol=0)
    torch.testing.assert_close(terms.chunk(freqs, torch.complex64), ref.to(torch.complex64), atol=1e-6 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("k,n,stride,dilation", GEOMETRIES)
def test_frequency_classes_share_their_gram_matrix(k, n, stride, dilation):
    layout = polyphase_layout((k, k), (n, n), Geometry(stride, dilation))
    taps = to_polyphase(torch.randn(4, 3, k, k, dtype=torch.float64), layout)
    side, _ = periodic._side(taps)
    freqs = periodic.HalfGrid.of(layout.grid).freqs
    reps, inverse = periodic.frequency_classes(freqs, layout.positions, layout.grid)
    q = periodic._GramSource(side, layout, len(freqs), 1).transfer(freqs)
    gram = q @ q.mH
    torch.testing.assert_close(gram, gram[reps][inverse], atol=1e-12 * float(gram.abs().max()), rtol=0)
    assert torch.equal(reps[inverse[reps]], reps)
    if len(layout.positions) == 1:
        assert len(reps) == 1  # a 1×1 conv: one eigenproblem for the whole layer


@pytest.mark.parametrize("kind", ["rank-deficient", "graded", "cluster-and-zeros"])
@pytest.mark.parametrize("stride", [1, 2])
def test_ill_conditioned_kernels_against_dense_operator(kind, stride):
    """Tiny and zero singular values are where a Gram matrix loses accuracy (σ² squares the condition number)."""
    w = ill_conditioned(kind, 8, 8 if kind == "cluster-and-zeros" else 6)
    n = 6
    ref = dense_singular_values(periodic_matrix(w, (n, n), (stride, stride)))
    got64 = singular_values(w, (n, n), Geometry((stride, stride)), dtype=torch.float64)
    torch.testing.assert_close(got64, ref, atol=1e-10 * ref[0], rtol=0)
    got32 = singular_values(w.float(), (n, n), Geometry((stride, stride)), dtype=torch.float32).double()
    assert (got32 - ref).abs().max() <= 1e-4 * ref[0]


@pytest.mark.parametrize("kind", ["rank-deficient", "graded", "cluster-and-zeros", "random"])
def test_float32_contract_at_realistic_width(kind):
    """64 channels on a 16×16 grid (too large for the dense operator: the paper's float64 FFT algorithm is the
    reference).  complex64 Gram eigenvalues would miss small σ here by up to ~1e-3·σmax."""
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64) if kind == "random" else ill_conditioned(kind, 64, 64)
    ref = fft_singular_values(w.float().double(), 16)
    got = singular_values(w.float(), (16, 16), dtype=torch.float32).double()
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4 * ref[0]
    got64 = singular_values(w, (16, 16), dtype=torch.float64)
    torch.testing.assert_close(got64, fft_singular_values(w, 16), atol=1e-10 * ref[0], rtol=0)


def test_gram_eigenvalues_are_used_only_where_they_are_safe():
    """A wide kernel (σmin far from 0) goes through Gram eigenvalues, its probe included; a wide kernel of rank
    deficient channels (σ = 0 at every frequency) and a square one with σ = 0 everywhere through svdvals everywhere,
    after a Gram probe (wide) or an svdvals probe (square).  All agree with the dense operator."""
    wide = torch.randn(8, 16, 3, 3, dtype=torch.float64)  # stride 2: 8 × 64
    deficient = ill_conditioned("rank-deficient", 8, 16)  # stride 2: 8 × 64 of rank 4 at every frequency
    square = ill_conditioned("cluster-and-zeros", 16, 16)
    for w, stride, all_exact, probe_exact in [(wide, 2, False, False), (deficient, 2, True, True),
                                              (square, 1, True, True)]:
        ref = dense_singular_values(periodic_matrix(w, (8, 8), (stride, stride)))
        for dtype in (torch.float32, torch.float64):
            layout, taps = periodic._layout_and_taps(w, (8, 8), Geometry((stride, stride)), dtype)
            side, _ = periodic._side(taps)
            freqs = periodic.HalfGrid.of(layout.grid).freqs
            spectrum = periodic._Spectrum(periodic._GramSource(side, layout, len(freqs), 1), freqs, dtype, None, 1)
            spectrum.compute()
            assert bool(spectrum.exact.all()) == all_exact
            assert bool(spectrum.exact[:1].all()) == probe_exact
            got = singular_values(w.to(dtype), (8, 8), Geometry((stride, stride)), dtype=dtype).double()
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            assert (got - ref).abs().max() <= tol * ref[0]


def test_untrusted_flags_small_values_only():
    # σ ≈ 0 next to σ = 1; σ ≥ 0.5; a quiet frequency (λmax(f) = 1e-4), whose errors are small in absolute terms;
    # σ ≈ 0 next to λmax(f) = 1e-2
    lam = torch.tensor([[0.0, 0.5, 1.0], [0.3, 0.5, 1.0], [0.0, 1e-6, 1e-4], [0.0, 1e-6, 1e-2]], dtype=torch.float64)
    flags = periodic._untrusted(lam, torch.complex64, 5e-5, 1.0)
    assert flags.tolist() == [True, False, False, True]
    assert not periodic._untrusted(lam, torch.complex128, 5e-5, 1.0).any()


@pytest.mark.parametrize("cin,stride", [(48, 1), (24, 2)])  # the svdvals path and the Gram path
def test_chunks_and_threads_do_not_change_values(monkeypatch, cin, stride):
    w = torch.randn(48, cin, 3, 3)
    geometry, size = Geometry((stride, stride)), (16 * stride, 16 * stride)
    for dtype in (torch.float32, torch.float64):
        ref = singular_values(w, size, geometry, dtype=dtype)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = singular_values(w, size, geometry, dtype=dtype)
            torch.set_num_threads(3)
            three = singular_values(w, size, geometry, dtype=dtype)
        finally:
            torch.set_num_threads(threads)
        monkeypatch.setattr(periodic, "DEFAULT_CHUNK_BYTES", 1)  # one frequency per chunk
        tiny = singular_values(w, size, geometry, dtype=dtype)
        monkeypatch.undo()
        for other in (single, three, tiny):
            torch.testing.assert_close(other, ref, atol=1e-6 * float(ref[0]), rtol=0)
        assert torch.get_num_threads() == threads


def test_memory_is_bounded_by_the_chunk(monkeypatch):
    """No tensor of the whole (frequencies × c × c) size: every chunk of transfer or Gram matrices respects
    DEFAULT_CHUNK_BYTES, for the svdvals path (square kernel) and the Gram path (wide, stride 2)."""
    sizes = []
    source = periodic._GramSource

    def spy(method):
        def wrapped(self, freqs, *args):
            out = method(self, freqs, *args)
            sizes.append(out.numel() * out.element_size())
            return out
        return wrapped
    monkeypatch.setattr(source, "chunk", spy(source.chunk))
    monkeypatch.setattr(source, "transfer", spy(source.transfer))
    monkeypatch.setattr(periodic, "DEFAULT_CHUNK_BYTES", 2**20)
    for w, stride in [(torch.randn(48, 48, 3, 3), 1), (torch.randn(48, 24, 3, 3), 2)]:
        sizes.clear()
        singular_values(w, (32, 32), Geometry((stride, stride)))
        clip(w, (32, 32), 0.1, Geometry((stride, stride)))
        full = len(periodic.HalfGrid.of((32 // stride, 32 // stride)).freqs) * 48 * 48 * 16
        assert sizes and max(sizes) <= 2**20 < full


@pytest.mark.parametrize("accumulate", ["frequency", "offsets"])
@pytest.mark.parametrize("cout,cin,k,n,stride,dilation", CASES)
def test_clip_float32_matches_float64(cout, cin, k, n, stride, dilation, accumulate):
    torch.manual_seed(2)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    bound = 0.6 * float(singular_values(w, (n, n), Geometry(stride, dilation), dtype=torch.float64)[0])
    exact = clip(w, (n, n), bound, Geometry(stride, dilation), dtype=torch.float64)
    fast = clip(w.float(), (n, n), bound, Geometry(stride, dilation), dtype=torch.float32, accumulate=accumulate)
    assert fast.dtype == torch.float32
    assert (fast.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("accumulate", ["frequency", "offsets"])
@pytest.mark.parametrize("factor", [0.95, 0.2])
def test_clip_near_and_far_below_sigma_max_is_sedghi_projection(factor, accumulate):
    """0.95·σmax: most frequencies have nothing to clip and are skipped; 0.2·σmax: every frequency is clipped."""
    torch.manual_seed(4)
    cout, cin, k, n = 6, 4, 3, 8
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    bound = factor * float(singular_values(w, (n, n), dtype=torch.float64)[0])
    got = clip(w, (n, n), bound, dtype=torch.float64, chunk=3, accumulate=accumulate)
    m = periodic_matrix(w, (n, n))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    rows = ((u * s.clamp(max=bound)) @ vh).reshape(cout, n, n, cin, n, n)[:, 0, 0]
    torch.testing.assert_close(got, rows[:, :, :k, :k], atol=1e-9, rtol=1e-9)


def test_clip_accumulate_is_checked():
    with pytest.raises(ValueError, match="accumulate"):
        clip(torch.randn(2, 2, 3, 3), (4, 4), 1.0, accumulate="fft")


def test_clip_offset_form_is_chosen_where_it_saves_flops():
    """The cost model behind ``accumulate="auto"``: many eigenpairs above the bound with many frequencies or a wide
    ``P̂`` favour the offsets; few active eigenpairs, or few frequencies of a square layer, the per-frequency
    products."""
    assert periodic._offset_form_cheaper(80, 514, 9, 160, 160, 13)  # 160 channels at 32×32, half active
    assert not periodic._offset_form_cheaper(4, 514, 9, 160, 160, 13)  # … four active
    assert periodic._offset_form_cheaper(320, 34, 4, 640, 1280, 5)  # stride 2, 320 → 640 at 16×16
    assert not periodic._offset_form_cheaper(640, 34, 9, 640, 640, 13)  # 640 channels at 8×8, all active


def test_clip_auto_mixes_both_forms_within_one_layer(monkeypatch):
    """With a cost model that alternates between the forms chunk by chunk, both accumulators are filled and their
    sum is still the Sedghi projection."""
    torch.manual_seed(5)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    bound = 0.3 * float(singular_values(w, (8, 8), dtype=torch.float64)[0])
    ref = clip(w, (8, 8), bound, dtype=torch.float64, accumulate="frequency")
    calls = []

    def alternate(*args):
        calls.append(len(calls) % 2 == 0)
        return calls[-1]
    monkeypatch.setattr(periodic, "_offset_form_cheaper", alternate)
    got = clip(w, (8, 8), bound, dtype=torch.float64, chunk=4, accumulate="auto")
    assert True in calls and False in calls
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
