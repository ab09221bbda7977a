"""embed / pose / merge_shards on a tiny randomly initialised model and a two-stack, two-optics-group STAR."""

import hashlib

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from console_lines import message_lines
from relion_files import optics_block
from tiny_run import BOX, TINY, save_run

from tvae_em import checkpoint, clustering, encode, infer, pose_quality, shards
from tvae_em.errors import InputError, UsageError
from tvae_em.io.columns import RELION_POSE
from tvae_em.io.stack import ArrayParticles, open_particles, write_stack
from tvae_em.io.star import new_relion31_star, numeric_column, read_star, write_star

N_ROWS = 25
APIX = (1.5, 2.0)  # per optics group: rows 0-14 in a.mrcs (group 1), rows 15-24 in b.mrcs (group 2)
BATCH = 4  # divides the shard boundaries used below, so sharded and unsharded runs see the same batches
# the tiny model is untrained: every command rightly warns that it cannot place the particles
pytestmark = pytest.mark.filterwarnings("ignore:most poses are uncertain")


def write_dataset(folder):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(N_ROWS, BOX, BOX)).astype(np.float32)
    write_stack(folder / "a.mrcs", images[:15], APIX[0])
    write_stack(folder / "b.mrcs", images[15:], APIX[1])
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["g1", "g2"],
                           "rlnImagePixelSize": list(APIX), "rlnImageSize": [BOX, BOX],
                           "rlnImageDimensionality": [2, 2], "rlnVoltage": [300.0, 200.0]})
    names = [f"{i:06d}@a.mrcs" for i in range(1, 16)] + [f"{i:06d}@b.mrcs" for i in range(1, 11)]
    particles = pd.DataFrame({"rlnImageName": names, "rlnAnglePsi": np.full(N_ROWS, 12.5),
                              "rlnOpticsGroup": [1] * 15 + [2] * 10, "rlnOriginXAngst": np.full(N_ROWS, 0.25),
                              "rlnOriginYAngst": np.full(N_ROWS, -0.5),
                              "rlnDefocusU": rng.uniform(1e4, 2e4, N_ROWS),
                              "rlnMicrographName": ["m 1.mrc"] * N_ROWS})
    star = folder / "particles.star"
    write_star(star, new_relion31_star(optics, particles))
    return star, images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("infer")
    star, images = write_dataset(folder)
    run_dir = save_run(folder / "run")
    model, _ = checkpoint.load_model(run_dir)
    return {"folder": folder, "star": star, "images": images, "run": run_dir, "model": model,
            "encoded": model.encode(torch.from_numpy(images))}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_input_columns_kept(input_star, output_star, replaced=()):
    before, after = read_star(input_star), read_star(output_star)
    assert list(before.blocks) == list(after.blocks)
    for name in before.blocks:
        for label in before[name].columns:
            if label not in replaced:
                assert after[name][label].tolist() == before[name][label].tolist(), (name, label)
        assert list(after[name].columns[:len(before[name].columns)]) == list(before[name].columns)


class CountingParticles(ArrayParticles):
    """ArrayParticles recording the largest batch read, to check the streaming bound."""

    largest = 0

    def read(self, indices):
        self.largest = max(self.largest, len(indices))
        return super().read(indices)


def test_encode_particles_streams_batches_and_matches_model(data):
    particles = CountingParticles(data["images"])
    result = encode.encode_particles(data["model"], particles, batch_size=BATCH, device="cpu", amp="off")
    assert particles.largest == BATCH
    expected = data["encoded"]
    for name in encode.ENCODED_FIELDS:
        np.testing.assert_allclose(result[name], getattr(expected, name).numpy(), rtol=1e-5, atol=1e-6)
    subset = np.array([24, 3, 7])
    picked = encode.encode_particles(data["model"], particles, batch_size=2, device="cpu", indices=subset, amp="off")
    np.testing.assert_allclose(picked["z_mu"], expected.z_mu.numpy()[subset], rtol=1e-5, atol=1e-6)
    assert picked["rotation_mass"].shape == (3, TINY["rotations"])


def test_encode_particles_in_bfloat16_is_close_to_float32(data):
    particles = open_particles(data["star"])
    exact = encode.encode_particles(data["model"], particles, batch_size=BATCH, device="cpu", amp="off")
    fast = encode.encode_particles(data["model"], particles, batch_size=BATCH, device="cpu", amp="bf16")
    assert np.abs(fast["z_mu"] - exact["z_mu"]).mean() < 0.05 * exact["z_mu"].std()
    half_pixel = 1 / BOX  # in the model frame, where a pixel is 2 / BOX
    assert np.mean(np.all(np.abs(fast["t"] - exact["t"]) < half_pixel, axis=1)) >= 0.8  # the same peak, mostly


def test_embed_writes_star_npz_and_figure(data, tmp_path, capsys):
    out = infer.embed(data["run"], data["star"], tmp_path / "embedded.star", clusters=3, batch_size=BATCH,
                      device="cpu", amp="off")
    assert capsys.readouterr().out == ""
    assert_input_columns_kept(data["star"], out)
    star = read_star(out)
    z = np.column_stack([numeric_column(star, "particles", f"tvaeZ0{k}") for k in (1, 2)])
    z_std = np.column_stack([numeric_column(star, "particles", f"tvaeZStd0{k}") for k in (1, 2)])
    np.testing.assert_allclose(z, data["encoded"].z_mu.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z_std, data["encoded"].z_std.numpy(), rtol=1e-5, atol=1e-6)
    labels = numeric_column(star, "particles", "tvaeCluster").astype(int)
    assert sorted(set(labels)) == [1, 2, 3]
    sizes = np.bincount(labels)[1:]
    assert list(sizes) == sorted(sizes, reverse=True)
    with np.load(tmp_path / "embedded_embedding.npz") as saved:
        np.testing.assert_array_equal(saved["z_mu"], z.astype(np.float32))
        np.testing.assert_array_equal(saved["rows"], np.arange(N_ROWS))
        np.testing.assert_array_equal(saved["cluster"], labels)
        np.testing.assert_allclose(saved["cluster_centers"][0], z[labels == 1].mean(0), rtol=1e-5)
    assert matplotlib.image.imread(tmp_path / "embedded_latent.png").ndim == 3


def test_embed_in_shards_then_merge_equals_unsharded(data, tmp_path):
    whole = infer.embed(data["run"], data["star"], tmp_path / "whole.star", clusters=2, method="kmeans",
                        batch_size=BATCH, device="cpu")
    parts = [infer.embed(data["run"], data["star"], tmp_path / "merged.star", clusters=2, method="kmeans",
                         shard=(i, 2), batch_size=BATCH, device="cpu") for i in (1, 0)]
    assert [p.name for p in parts] == ["merged.shard1of2.npz", "merged.shard0of2.npz"]
    assert not (tmp_path / "merged.star").exists()
    merged = infer.merge_shards(parts, tmp_path / "merged.star")
    assert merged.read_bytes() == whole.read_bytes()
    with np.load(tmp_path / "whole_embedding.npz") as a, np.load(tmp_path / "merged_embedding.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_pose_writes_relion_convention(data, tmp_path):
    before = sha256(data["star"])
    out = infer.pose(data["run"], data["star"], tmp_path / "posed.star", batch_size=BATCH, device="cpu",
                     amp="off")
    assert sha256(data["star"]) == before
    assert_input_columns_kept(data["star"], out, replaced=RELION_POSE)
    star = read_star(out)
    col = lambda label: numeric_column(star, "particles", label)  # noqa: E731
    theta = data["encoded"].theta.double().numpy()
    t_px = data["encoded"].t.double().numpy() * (BOX / 2)
    apix = np.array([APIX[0]] * 15 + [APIX[1]] * 10)
    psi_error = np.remainder(col("rlnAnglePsi") - np.degrees(theta) + 180, 360) - 180
    np.testing.assert_allclose(psi_error, 0, atol=1e-3)
    assert np.all((col("rlnAnglePsi") > -180) & (col("rlnAnglePsi") <= 180))
    np.testing.assert_allclose(col("rlnOriginXAngst"), -t_px[:, 0] * apix, atol=1e-5)
    np.testing.assert_allclose(col("rlnOriginYAngst"), -t_px[:, 1] * apix, atol=1e-5)
    np.testing.assert_allclose(col("tvaePoseEntropy"), data["encoded"].entropy.numpy(), rtol=1e-5)
    np.testing.assert_allclose(col("tvaePoseMaxProb"), data["encoded"].max_prob.numpy(), rtol=1e-5)
    mass = data["encoded"].rotation_mass.numpy()
    np.testing.assert_allclose(col("tvaeRotationMassTop"), mass.max(1), rtol=1e-5)
    np.testing.assert_allclose(col("tvaePoseLocalMass"), data["encoded"].local_mass.numpy(), rtol=1e-5)
    located = data["encoded"].translation_mass.numpy() >= pose_quality.CONFIDENT_MASS
    np.testing.assert_array_equal(col("tvaeSymmetryHint"), np.where(located, pose_quality.symmetry_hint(mass), 0))
    assert star["particles"]["rlnMicrographName"].iloc[0] == "m 1.mrc"
    assert matplotlib.image.imread(tmp_path / "posed_poses.png").ndim == 3


def test_untrained_model_says_its_poses_are_uncertain_and_gives_no_symmetry_hint(data, tmp_path, capsys):
    with pytest.warns(UserWarning, match="most poses are uncertain"):
        out = infer.pose(data["run"], data["star"], tmp_path / "posed.star", batch_size=BATCH, device="cpu")
    star = read_star(out)
    assert np.all(numeric_column(star, "particles", "tvaePoseLocalMass") < pose_quality.CONFIDENT_MASS)
    assert np.all(numeric_column(star, "particles", "tvaeSymmetryHint") == 0)  # not 4 (R) for every particle
    assert f"{N_ROWS} of {N_ROWS} particles (100.0 %) have uncertain poses" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="most poses are uncertain"):
        embedded = infer.embed(data["run"], data["star"], tmp_path / "embedded.star", device="cpu")
    assert len(numeric_column(read_star(embedded), "particles", "tvaePoseLocalMass")) == N_ROWS


def test_pose_keeps_the_angles_of_a_3d_refinement_unless_asked(data, tmp_path):
    star = read_star(data["star"])
    refined = star["particles"].assign(rlnAngleRot="33.5", rlnAngleTilt="91.25")
    path = tmp_path / "refined.star"
    write_star(path, star.replace("particles", refined))
    for name in ("a.mrcs", "b.mrcs"):
        (tmp_path / name).write_bytes((data["folder"] / name).read_bytes())
    kept = read_star(infer.pose(data["run"], path, tmp_path / "kept.star", device="cpu"))
    assert_input_columns_kept(path, tmp_path / "kept.star")  # rlnAnglePsi and the origins untouched
    psi = numeric_column(kept, "particles", "tvaeAnglePsi")
    np.testing.assert_allclose(np.radians(psi) % (2 * np.pi), data["encoded"].theta.numpy(), atol=1e-4)
    assert "tvaeOriginXAngst" in kept["particles"] and "tvaeOriginYAngst" in kept["particles"]
    replaced = read_star(infer.pose(data["run"], path, tmp_path / "replaced.star", device="cpu",
                                    replace_angles=True))
    np.testing.assert_allclose(numeric_column(replaced, "particles", "rlnAnglePsi"), psi)
    assert "tvaeAnglePsi" not in replaced["particles"]
    assert replaced["particles"]["rlnAngleRot"].tolist() == ["33.5"] * N_ROWS


def test_pose_in_three_shards_then_merge_equals_unsharded(data, tmp_path):
    whole = infer.pose(data["run"], data["star"], tmp_path / "whole.star", batch_size=BATCH, device="cpu")
    parts = [infer.pose(data["run"], data["star"], tmp_path / "merged.star", shard=(i, 3), batch_size=BATCH,
                        device="cpu") for i in range(3)]
    assert [len(shards.Results.load(p).rows) for p in parts] == [8, 8, 9]
    assert infer.merge_shards(parts, tmp_path / "merged.star").read_bytes() == whole.read_bytes()


def test_merge_refuses_incomplete_repeated_or_foreign_shards(data, tmp_path):
    star = tmp_path / "copy.star"
    star.write_bytes(data["star"].read_bytes())
    for name in ("a.mrcs", "b.mrcs"):
        (tmp_path / name).write_bytes((data["folder"] / name).read_bytes())
    def run(fn, i, out="out.star", **options):
        return fn(data["run"], star, tmp_path / out, shard=(i, 2), batch_size=BATCH, device="cpu", **options)

    first, second = run(infer.embed, 0), run(infer.embed, 1)
    with pytest.raises(InputError, match="in none of the 1 shards"):
        infer.merge_shards([first], tmp_path / "merged.star")
    with pytest.raises(InputError, match="more than once"):
        infer.merge_shards([first, first, second], tmp_path / "merged.star")
    other = run(infer.embed, 1, out="other.star", clusters=2)
    with pytest.raises(InputError, match="differs in clusters"):
        infer.merge_shards([first, other], tmp_path / "merged.star")
    with pytest.raises(InputError, match="a shard of 'pose'"):
        infer.merge_shards([first, run(infer.pose, 1, out="posed.star")], tmp_path / "merged.star")
    star.write_bytes(star.read_bytes() + b"\n")
    with pytest.raises(InputError, match="changed since the shards"):
        infer.merge_shards([first, second], tmp_path / "merged.star")
    assert not (tmp_path / "merged.star").exists()


def test_refuses_overwriting_input_and_wrong_box(data, tmp_path):
    with pytest.raises(UsageError, match="is also an input"):
        infer.pose(data["run"], data["star"], data["star"], device="cpu")
    other = save_run(tmp_path / "run24", image_size=24)
    with pytest.raises(UsageError, match="trained on 24 px"):
        infer.embed(other, data["star"], tmp_path / "out.star", device="cpu")


def test_shard_rows_are_contiguous_and_cover_every_row():
    blocks = [shards.shard_rows(10, (i, 3)) for i in range(3)]
    assert [b.tolist() for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    np.testing.assert_array_equal(shards.shard_rows(10), np.arange(10))
    assert shards.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(UsageError):
            shards.parse_shard(bad)


def test_symmetry_hint_recognises_cyclic_patterns():
    r = 12
    one_hot = np.eye(r)[[5]]
    two_fold = (np.eye(r)[1] + np.eye(r)[7])[None] / 2
    three_fold = (np.eye(r)[[2, 6, 10]].sum(0) * 0.3 + 0.1 / r)[None]  # plus a little uniform background
    between_bins = (0.6 * np.eye(r)[3] + 0.4 * np.eye(r)[4])[None]  # C1 object between two rotation bins
    uniform = np.full((1, r), 1 / r)
    masses = np.concatenate([one_hot, two_fold, three_fold, between_bins, uniform])
    assert pose_quality.symmetry_hint(masses).tolist() == [1, 2, 3, 1, 12]


def test_large_ward_fits_a_subsample_and_assigns_the_rest(monkeypatch):
    monkeypatch.setattr(clustering, "WARD_MAX_POINTS", 60)
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat([0, 1, 2], [200, 120, 80])
    z = centres[truth] + rng.normal(scale=0.5, size=(len(truth), 2))
    labels = clustering.cluster_latents(z, 3, method="ward", seed=0)
    assert labels.tolist() == (truth + 1).tolist()  # biggest blob is cluster 1


# --- class numbers RELION can use, and clustering at the merge (issue 14) ----------------------------------------

CLASS2D_OPTICS = optics_block(
    "opticsGroup1 1 0.750000 300.000000 2.700000 0.100000 1.500000 16 2",
    "opticsGroup2 2 1.000000 200.000000 2.700000 0.100000 2.000000 16 2",
) + """

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnOpticsGroup #3
_rlnAnglePsi #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
_rlnClassNumber #7
_rlnNormCorrection #8
_rlnLogLikeliContribution #9
_rlnMaxValueProbDistribution #10
_rlnNrOfSignificantSamples #11
"""
RELION30_LABELS = ("rlnImageName", "rlnMicrographName", "rlnVoltage", "rlnSphericalAberration",
                   "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize", "rlnAnglePsi")


def class2d_star(folder):
    """The particles of ``write_dataset`` as RELION 3.1's Class2D writes them (run_it025_data.star): with the
    rlnClassNumber of a 50-class classification."""
    rows = [f"{i:06d}@{stack} MotionCorr/job002/mic{1 + k // 10}.mrc {group} {12.5 + k:.6f} 0.750000 -1.500000 "
            f"{1 + (7 * k) % 50} 0.998731 2.105731e+05 0.512344 3"
            for k, (i, stack, group) in enumerate([(i, "a.mrcs", 1) for i in range(1, 16)] +
                                                  [(i, "b.mrcs", 2) for i in range(1, 11)])]
    path = folder / "run_it025_data.star"
    path.write_text(CLASS2D_OPTICS + "\n".join(rows) + "\n")
    return path


def relion30_star(folder):
    """The particles of ``write_dataset`` in RELION 3.0's one-block layout, without a classification."""
    rows = [f"{i:06d}@{stack} mic1.mrc {kv:.6f} 2.700000 0.100000 10000.000000 {apix:.6f} 0.000000"
            for stack, count, kv, apix in (("a.mrcs", 15, 300, APIX[0]), ("b.mrcs", 10, 200, APIX[1]))
            for i in range(1, count + 1)]
    header = "".join(f"_{label} #{n}\n" for n, label in enumerate(RELION30_LABELS, start=1))
    path = folder / "particles30.star"
    path.write_text(f"\ndata_\n\nloop_\n{header}" + "\n".join(rows) + "\n")
    return path


def tvae_em(argv, capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines (progress lines aside) of ``tvae-em argv`` on the CPU."""
    from tvae_em.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--device", "cpu"] if argv[0] != "merge" else argv)
    return exited.value.code, message_lines(capsys.readouterr().err)


def star_column(path, label):
    return numeric_column(read_star(path), "particles", label).astype(int).tolist()


def test_embed_writes_the_clusters_to_rlnClassNumber_of_a_relion30_star(data, tmp_path, capsys):
    code, lines = tvae_em(["embed", str(data["run"]), str(relion30_star(data["folder"])), "-o",
                           str(tmp_path / "embedded.star"), "--clusters", "3"], capsys)
    assert code == 0 and not any(line.startswith("note") for line in lines)
    clusters = star_column(tmp_path / "embedded.star", "tvaeCluster")
    assert star_column(tmp_path / "embedded.star", "rlnClassNumber") == clusters
    assert sorted(set(clusters)) == [1, 2, 3]


def test_embed_keeps_an_earlier_classification_unless_asked_to_replace_it(data, tmp_path, capsys):
    star = class2d_star(data["folder"])
    earlier = star_column(star, "rlnClassNumber")
    code, lines = tvae_em(["embed", str(data["run"]), str(star), "-o", str(tmp_path / "kept.star"),
                           "--clusters", "3"], capsys)
    assert code == 0 and star_column(tmp_path / "kept.star", "rlnClassNumber") == earlier
    assert_input_columns_kept(star, tmp_path / "kept.star")
    (note,) = [line for line in lines if line.startswith("note")]
    assert "has its own rlnClassNumber (an earlier classification): kept" in note
    code, lines = tvae_em(["embed", str(data["run"]), str(star), "-o", str(tmp_path / "replaced.star"),
                           "--clusters", "3", "--class-number", "replace"], capsys)
    assert code == 0
    assert star_column(tmp_path / "replaced.star", "rlnClassNumber") == star_column(tmp_path / "replaced.star",
                                                                                    "tvaeCluster")
    assert_input_columns_kept(star, tmp_path / "replaced.star", replaced=("rlnClassNumber",))
    (note,) = [line for line in lines if line.startswith("note")]
    assert "is replaced by the 3 clusters of _tvaeCluster" in note


def test_merge_clusters_the_shards_as_an_unsharded_embed_does(data, tmp_path, capsys):
    star = str(class2d_star(data["folder"]))
    for i in (0, 1):
        assert tvae_em(["embed", str(data["run"]), star, "-o", str(tmp_path / "merged.star"), "--shard", f"{i}/2",
                        "--batch-size", str(BATCH)], capsys)[0] == 0
    shards = [str(tmp_path / f"merged.shard{i}of2.npz") for i in (0, 1)]
    code, lines = tvae_em(["merge", *shards, "-o", str(tmp_path / "merged.star"), "--clusters", "3", "--method",
                           "kmeans", "--class-number", "replace"], capsys)
    assert code == 0 and any("is replaced by the 3 clusters" in line for line in lines)
    assert tvae_em(["embed", str(data["run"]), star, "-o", str(tmp_path / "whole.star"), "--clusters", "3",
                    "--method", "kmeans", "--class-number", "replace", "--batch-size", str(BATCH)], capsys)[0] == 0
    assert (tmp_path / "merged.star").read_bytes() == (tmp_path / "whole.star").read_bytes()
    with np.load(tmp_path / "whole_embedding.npz") as whole, np.load(tmp_path / "merged_embedding.npz") as merged:
        np.testing.assert_array_equal(whole["cluster"], merged["cluster"])
    # pose shards have no latents to cluster
    for i in (0, 1):
        infer.pose(data["run"], star, tmp_path / "posed.star", shard=(i, 2), device="cpu")
    code, lines = tvae_em(["merge", str(tmp_path / "posed.shard0of2.npz"), str(tmp_path / "posed.shard1of2.npz"),
                           "-o", str(tmp_path / "posed.star"), "--clusters", "3"], capsys)
    assert code == 2 and lines == [f"error: {tmp_path / 'posed.shard0of2.npz'} holds results of 'pose': only "
                                   "embed shards can be clustered"]
