"""The calibrated identity metric: margin, ceiling, retention, bootstrap intervals, paired differences."""
import numpy as np
import pytest

from realisid.metrics.calibrated import calibrated_identity, other_similarity, paired_difference, scored

BINS = ["tiny", "large"]


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _world(rng, n_ids=10, dim=16, noise=0.6):
    """Identity centres on the unit sphere; a face of identity i is its centre plus noise."""
    centres = {f"id{i}": _unit(rng.standard_normal(dim)) for i in range(n_ids)}

    def face(ident, scale=noise):
        return _unit(centres[ident] + scale * rng.standard_normal(dim) / np.sqrt(dim))

    return centres, face


def _rows(faces, refs, bin_name="tiny", found=True):
    rows = []
    for ident, emb in faces:
        r = scored(float(emb @ refs[ident]), other_similarity(emb, refs, ident), found)
        rows.append({**r, "identity": ident, "bin": bin_name})
    return rows


def test_scored_counts_misses_as_zero():
    assert scored(0.9, 0.2, False) == {"sim_ref": 0.0, "sim_other": 0.0, "margin": 0.0, "found": 0.0}
    r = scored(0.9, 0.2, True)
    assert r["margin"] == pytest.approx(0.7) and r["found"] == 1.0


def test_other_similarity_is_the_mean_over_the_other_references():
    refs = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([-1.0, 0.0])}
    assert other_similarity(np.array([1.0, 0.0]), refs, "a") == pytest.approx((0.0 - 1.0) / 2)
    with pytest.raises(ValueError, match="at least two identities"):
        other_similarity(np.array([1.0, 0.0]), {"a": refs["a"]}, "a")


def test_margin_is_zero_when_the_reference_is_a_random_identity():
    rng = np.random.default_rng(0)
    centres, face = _world(rng)
    refs = {k: face(k) for k in centres}
    ids = sorted(centres)
    # "generated" faces that ignore their reference: each shows a random identity
    gen = [(ids[i % len(ids)], face(ids[int(rng.integers(len(ids)))])) for i in range(400)]
    real = [(k, face(k)) for k in ids for _ in range(10)]
    out = calibrated_identity(_rows(gen, refs), _rows(real, refs), BINS, n_boot=500)
    m, lo, hi = out["tiny"]["margin"]
    assert abs(m) < 0.05 and lo < 0.0 < hi
    c, clo, chi = out["tiny"]["ceiling"]
    assert c > 0.3 and clo > 0.2
    assert abs(out["tiny"]["retention"][0]) < 0.15


def test_generated_faces_that_are_real_photos_retain_everything():
    rng = np.random.default_rng(1)
    centres, face = _world(rng)
    refs = {k: face(k) for k in centres}
    real = _rows([(k, face(k)) for k in sorted(centres) for _ in range(8)], refs)
    out = calibrated_identity(real, real, BINS, n_boot=300)
    e = out["tiny"]
    assert e["margin"][0] == pytest.approx(e["ceiling"][0])
    assert e["retention"][0] == pytest.approx(1.0)
    assert e["retention"][1] <= 1.0 <= e["retention"][2]
    assert e["found_rate"] == (1.0, 1.0, 1.0)
    assert "large" not in out and out["all"]["n"] == len(real)


def test_misses_lower_the_margin_and_the_found_rate():
    rng = np.random.default_rng(2)
    centres, face = _world(rng, noise=0.2)
    refs = {k: face(k) for k in centres}
    faces = [(k, face(k)) for k in sorted(centres) for _ in range(4)]
    hit = _rows(faces, refs)
    half = _rows(faces[::2], refs) + _rows(faces[1::2], refs, found=False)
    full, partial = calibrated_identity(hit, hit, BINS, n_boot=100), calibrated_identity(half, hit, BINS, n_boot=100)
    assert partial["tiny"]["found_rate"][0] == pytest.approx(0.5)
    assert partial["tiny"]["margin"][0] < 0.7 * full["tiny"]["margin"][0]


def test_intervals_resample_identities_not_faces():
    # one identity with many faces and a big margin, nine with few and none: a face bootstrap would be sure of a
    # positive margin, an identity bootstrap must not be
    rows = [{"identity": "big", "bin": "tiny", **scored(0.9, 0.0, True)} for _ in range(200)]
    rows += [{"identity": f"id{i}", "bin": "tiny", **scored(0.0, 0.0, True)} for i in range(9)]
    lo = calibrated_identity(rows, rows, BINS, n_boot=1000)["tiny"]["margin"][1]
    assert lo < 0.05


def test_paired_difference_on_shared_cases():
    base = [{"size_px": s, "people": 1, "ref": r, "person": 0, "prompt": 0, "identity": f"id{r}", "bin": "tiny" if s < 64 else "large",
             "margin": 0.1} for s in (24, 128) for r in range(6)]
    better = [{**row, "margin": row["margin"] + (0.2 if row["bin"] == "tiny" else 0.0)} for row in base]
    diff = paired_difference(better, base, BINS, n_boot=200)
    assert diff["tiny"][0] == pytest.approx(0.2) and diff["tiny"][1] == pytest.approx(0.2)
    assert diff["large"][0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="share no benchmark case"):
        paired_difference(better, [{**base[0], "size_px": 999}], BINS)


def test_paired_difference_pools_replicates_and_their_spread_widens_the_interval():
    """Two training seeds of a run: one beats the baseline by 0.2 in tiny, the other not at all. Pooled, the
    difference is their mean and the interval spans both seeds (identity resampling alone would be a point:
    every identity moves by the same amount)."""
    base = [{"size_px": s, "people": 1, "ref": r, "person": 0, "prompt": 0, "identity": f"id{r}", "bin": "tiny" if s < 64 else "large",
             "margin": 0.1 * r} for s in (24, 128) for r in range(6)]
    seed_a = [{**row, "margin": row["margin"] + (0.2 if row["bin"] == "tiny" else 0.0)} for row in base]
    seed_b = [dict(row) for row in base]
    assert paired_difference([seed_a], [base], BINS, n_boot=300) == paired_difference(seed_a, base, BINS, n_boot=300)
    one = paired_difference(seed_a, base, BINS, n_boot=300)["tiny"]
    assert one == pytest.approx((0.2, 0.2, 0.2))
    value, lo, hi = paired_difference([seed_a, seed_b], [base, base], BINS, n_boot=2000)["tiny"]
    assert value == pytest.approx(0.1) and lo == pytest.approx(0.0) and hi == pytest.approx(0.2)
    assert paired_difference([seed_a, seed_b], [base], BINS)["large"][:3] == pytest.approx((0.0, 0.0, 0.0))
    # a case one replicate lacks is left out of every replicate
    partial = [r for r in seed_b if not (r["bin"] == "tiny" and r["ref"] == 5)]
    assert paired_difference([seed_a, partial], [base], BINS, n_boot=50)["tiny"][0] == pytest.approx(0.1)
