"""cryoSPARC .cs particle files read wherever a particle STAR is: datasets built with the field names and dtypes
cryoSPARC writes (np.save of a structured array, no .npy suffix, fixed-width byte strings), stacks written with
mrcfile in a cryoSPARC project layout (J10/extract/*.mrc, the .cs in the job folder)."""

import shutil
from pathlib import Path

import matplotlib.image
import mrcfile
import numpy as np
import pytest

from tvae_em.cli import main
from tvae_em.errors import EXIT_DATA, InputError
from tvae_em.io.cryosparc import read_cryosparc
from tvae_em.io.relion import CTF_COLUMNS
from tvae_em.io.stack import open_particles
from tvae_em.io.star import read_star
from tvae_em.poses import align_image, apply_pose, relion_to_model

BOX = 16
# The fields of an Extract from Micrographs job's particles, with the dtypes cryoSPARC writes (cryosparc-tools'
# dataset tests list the same); blob/path and the string fields are fixed-width bytes in a saved .cs.
BLOB = [("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("blob/import_sig", "<u8")]
CTF = [("ctf/type", "S8"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
       ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
       ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"), ("ctf/scale_const", "<f4"),
       ("ctf/shift_A", "<f4", (2,)), ("ctf/tilt_A", "<f4", (2,)), ("ctf/trefoil_A", "<f4", (2,)),
       ("ctf/tetra_A", "<f4", (4,)), ("ctf/anisomag", "<f4", (4,)), ("ctf/bfactor", "<f4")]
LOCATION = [("location/micrograph_uid", "<u8"), ("location/exp_group_id", "<u4"),
            ("location/micrograph_path", "S64"), ("location/micrograph_shape", "<u4", (2,)),
            ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4")]
# A 2-D classification's particles: blob and alignments2D (the CTF stays in its passthrough file).
ALIGNMENTS2D = [("alignments2D/split", "<u4"), ("alignments2D/shift", "<f4", (2,)), ("alignments2D/pose", "<f4"),
                ("alignments2D/psize_A", "<f4"), ("alignments2D/error", "<f4"), ("alignments2D/error_min", "<f4"),
                ("alignments2D/resid_pow", "<f4"), ("alignments2D/slice_pow", "<f4"),
                ("alignments2D/image_pow", "<f4"), ("alignments2D/cross_cor", "<f4"), ("alignments2D/alpha", "<f4"),
                ("alignments2D/alpha_min", "<f4"), ("alignments2D/weight", "<f4"), ("alignments2D/pose_ess", "<f4"),
                ("alignments2D/shift_ess", "<f4"), ("alignments2D/class_posterior", "<f4"),
                ("alignments2D/class", "<u4"), ("alignments2D/class_ess", "<f4")]


def save_cs(path, fields, values: dict, n: int | None = None) -> Path:
    """A .cs file of ``n`` particles (default: as many as blob/idx lists) as cryoSPARC writes one: np.save of the
    records to the open file (np.save given a name would add .npy); fields not in ``values`` are 0."""
    records = np.zeros(len(values["blob/idx"]) if n is None else n, dtype=fields)
    for name, column in values.items():
        records[name] = column
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.save(handle, records)
    return path


def write_mrc(path, images, apix):
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(images, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = apix


def run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, [line for line in capsys.readouterr().err.splitlines() if "%|" not in line]


@pytest.fixture
def project(tmp_path):
    """A cryoSPARC project folder with one Extract job: two stacks (5 and 3 images) and J10_particles.cs listing
    their images out of order, from two exposure groups (300 kV, 1.1 A/px; 200 kV, 1.3 A/px), some paths with
    cryoSPARC's '>' prefix."""
    root = tmp_path / "CS-project"
    rng = np.random.default_rng(7)
    stacks = {"J10/extract/mic1_particles.mrc": rng.normal(size=(5, BOX, BOX)),
              "J10/extract/mic2_particles.mrc": rng.normal(size=(3, BOX, BOX))}
    for name, images in stacks.items():
        write_mrc(root / name, images, apix=9.0)  # header pixel size that the .cs overrides
    paths = [b">J10/extract/mic1_particles.mrc", b"J10/extract/mic2_particles.mrc", b"J10/extract/mic1_particles.mrc",
             b">J10/extract/mic2_particles.mrc", b"J10/extract/mic1_particles.mrc"]
    idx = [4, 0, 1, 2, 0]
    group = np.array([1, 2, 1, 2, 1])
    values = {"uid": [10 ** 18 + k for k in range(5)], "blob/path": paths, "blob/idx": idx,
              "blob/shape": np.full((5, 2), BOX), "blob/psize_A": np.where(group == 1, 1.1, 1.3),
              "blob/sign": -1.0, "ctf/type": b"imported", "ctf/exp_group_id": group,
              "ctf/accel_kv": np.where(group == 1, 300.0, 200.0), "ctf/cs_mm": np.where(group == 1, 2.7, 2.0),
              "ctf/amp_contrast": 0.1, "ctf/df1_A": [12000.0, 15000.5, 18000.0, 21000.0, 9000.0],
              "ctf/df2_A": [11000.0, 14500.0, 17500.0, 20000.0, 8800.0],
              "ctf/df_angle_rad": [0.5, -1.0, 3.0, 0.0, 1.25], "ctf/phase_shift_rad": [0.0, 0.0, 0.0, 0.0, np.pi / 2],
              "ctf/scale": 1.0, "ctf/bfactor": [0.0, 10.0, 0.0, 0.0, 0.0],
              "location/micrograph_path": b"J9/motioncorrected/mic1.mrc", "location/center_x_frac": 0.5}
    cs = save_cs(root / "J10" / "J10_particles.cs", BLOB + CTF + LOCATION, values)
    expected = np.stack([stacks[p.decode().lstrip(">")][i] for p, i in zip(paths, idx, strict=True)])
    return {"root": root, "cs": cs, "values": values, "images": expected.astype(np.float32),
            "stacks": {root / name for name in stacks}}


# --- reading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_datadir", [True, False])
def test_extract_job_gives_its_images_ctf_and_an_optics_group_per_exposure_group(project, with_datadir):
    datadir = project["root"] if with_datadir else None  # without: found from the .cs file's parent folder
    values = project["values"]
    with open_particles(project["cs"], datadir=datadir) as particles:
        assert len(particles) == 5 and particles.box == BOX
        np.testing.assert_array_equal(particles.read(np.arange(5)), project["images"])
        table = particles.table
        optics, rows = table["optics"], table["particles"]
        assert table.path == project["cs"]
        assert optics["rlnOpticsGroup"].tolist() == ["1", "2"]
        assert optics["rlnOpticsGroupName"].tolist() == ["expGroup1", "expGroup2"]
        assert optics["rlnImagePixelSize"].astype(float).tolist() == pytest.approx([1.1, 1.3])
        assert optics["rlnVoltage"].astype(float).tolist() == [300.0, 200.0]
        assert optics["rlnSphericalAberration"].astype(float).tolist() == pytest.approx([2.7, 2.0])
        assert optics["rlnImageSize"].tolist() == [str(BOX)] * 2
        assert rows["rlnOpticsGroup"].tolist() == ["1", "2", "1", "2", "1"]
        np.testing.assert_allclose(particles.pixel_sizes, [1.1, 1.3, 1.1, 1.3, 1.1], rtol=1e-6)
        assert rows["tvaeCryosparcUid"].tolist() == [str(10 ** 18 + k) for k in range(5)]
        # every image name points at the stack it was read from, RELION-style (1-based, 6 digits)
        index, stacks = rows["rlnImageName"].str.partition("@")[[0, 2]].T.to_numpy()
        assert list(index) == ["000005", "000001", "000002", "000003", "000001"]
        assert {Path(name).resolve() for name in stacks} == project["stacks"]
        ctf = dict(zip([label for _, label, _ in CTF_COLUMNS], particles.ctf.T, strict=False))
    np.testing.assert_allclose(ctf["rlnDefocusU"], values["ctf/df1_A"])
    np.testing.assert_allclose(ctf["rlnDefocusV"], values["ctf/df2_A"])
    np.testing.assert_allclose(ctf["rlnDefocusAngle"], np.degrees(values["ctf/df_angle_rad"]), rtol=1e-6)
    np.testing.assert_allclose(ctf["rlnPhaseShift"], [0, 0, 0, 0, 90.0], rtol=1e-6)
    np.testing.assert_allclose(ctf["rlnCtfBfactor"], values["ctf/bfactor"])
    np.testing.assert_allclose(ctf["rlnVoltage"], [300, 200, 300, 200, 300])
    np.testing.assert_allclose(ctf["rlnAmplitudeContrast"], 0.1, rtol=1e-6)


def test_content_not_the_suffix_tells_a_cs_file(project):
    renamed = shutil.copy(project["cs"], project["cs"].with_name("particles_exported"))
    with open_particles(renamed) as particles:
        np.testing.assert_array_equal(particles.read(np.arange(5)), project["images"])


@pytest.mark.parametrize("path_dtype", ["S48", "U48"])
def test_import_without_ctf_or_alignments(tmp_path, path_dtype):
    """Only blob fields (an import with no CTF): one optics group, no CTF, no classes or poses; without
    blob/psize_A the pixel size is the MRC header's."""
    images = np.random.default_rng(3).normal(size=(3, BOX, BOX)).astype(np.float32)
    write_mrc(tmp_path / "J2/imported/stack.mrcs", images, apix=2.5)
    fields = [("uid", "<u8"), ("blob/path", path_dtype), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,))]
    cs = save_cs(tmp_path / "J2/imported_particles.cs", fields,
                 {"uid": [1, 2, 3], "blob/path": ["J2/imported/stack.mrcs"] * 3, "blob/idx": [2, 1, 0],
                  "blob/shape": np.full((3, 2), BOX)})
    with open_particles(cs, datadir=tmp_path) as particles:
        np.testing.assert_array_equal(particles.read([0, 1, 2]), images[::-1])
        assert particles.ctf is None and particles.pixel_size == pytest.approx(2.5)
        assert particles.table["optics"]["rlnOpticsGroupName"].tolist() == ["expGroup1"]
        labels = set(particles.table["particles"].columns)
    assert not labels & {"rlnDefocusU", "rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst"}


def test_2d_classification_gives_classes_and_poses_in_relion_units(tmp_path):
    """Classes from 0 become RELION's from 1; the pose in radians becomes degrees; the shift, in pixels of the
    classification (alignments2D/psize_A, here twice the stack's), becomes Angstrom."""
    write_mrc(tmp_path / "J10/extract/a.mrc", np.zeros((3, BOX, BOX)), apix=1.0)
    cs = save_cs(tmp_path / "J20/J20_020_particles.cs", BLOB + ALIGNMENTS2D,
                 {"blob/path": [b"J10/extract/a.mrc"] * 3, "blob/idx": [0, 1, 2], "blob/psize_A": 1.25,
                  "alignments2D/class": [0, 4, 1], "alignments2D/pose": [0.25, 3.5, -1.0],
                  "alignments2D/psize_A": 2.5, "alignments2D/shift": [[1.0, -2.0], [0.5, 0.0], [-3.0, 4.0]]})
    rows = read_cryosparc(cs)["particles"]
    assert rows["rlnClassNumber"].tolist() == ["1", "5", "2"]
    np.testing.assert_allclose(rows["rlnAnglePsi"].astype(float), np.degrees([0.25, 3.5, -1.0]), rtol=1e-6)
    np.testing.assert_allclose(rows["rlnOriginXAngst"].astype(float), [2.5, 1.25, -7.5])
    np.testing.assert_allclose(rows["rlnOriginYAngst"].astype(float), [-5.0, 0.0, 10.0])


def asymmetric_object(box=32) -> np.ndarray:
    """Three Gaussian blobs of different sizes and weights off the centre: no rotation or mirror maps it onto
    itself, and it is zero near the border, so posing it loses nothing."""
    y, x = np.mgrid[:box, :box] - box // 2
    blobs = [(-5, -4, 3.0, 1.0), (6, -3, 2.0, 0.6), (0, 6, 2.5, 0.8)]  # (x, y, sigma, weight)
    return sum(w * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s ** 2)) for cx, cy, s, w in blobs)


def test_averages_align_particles_by_the_converted_2d_poses(tmp_path, capsys):
    """Particles posed by known RELION poses (psi, origin), recorded in the .cs as pyem reads cryoSPARC's (pose =
    psi in radians, shift = origin in pixels of the classification, here binned 2x): 'averages' of the .cs, which
    aligns by +origin then +psi, gives back the object; the opposite signs would not."""
    box, apix = 32, 1.5
    canonical = asymmetric_object(box)
    psi = np.array([30.0, 100.0, 215.0, 300.0])
    origin_angst = np.array([[3.0, -4.5], [-6.0, 1.5], [4.5, 4.5], [0.0, -3.0]])
    theta, t_model = relion_to_model(psi, origin_angst[:, 0], origin_angst[:, 1], box, apix)
    write_mrc(tmp_path / "J10/extract/posed.mrc", apply_pose(np.stack([canonical] * 4), theta, t_model), apix)
    cs = save_cs(tmp_path / "J30/J30_020_particles.cs", BLOB + ALIGNMENTS2D,
                 {"blob/path": [b">J10/extract/posed.mrc"] * 4, "blob/idx": np.arange(4), "blob/psize_A": apix,
                  "blob/shape": np.full((4, 2), box), "alignments2D/class": [0] * 4,
                  "alignments2D/pose": np.radians(psi), "alignments2D/psize_A": 2 * apix,
                  "alignments2D/shift": origin_angst / (2 * apix)})
    code, lines = run(["averages", str(cs), "-o", str(tmp_path / "avg"), "--ctf", "none"], capsys)
    assert code == 0, lines
    with mrcfile.open(tmp_path / "avg" / "averages.mrcs") as mrc:
        average = mrc.data.reshape(-1, box, box)[0]
    assert np.corrcoef(average.ravel(), canonical.ravel())[0, 1] > 0.97
    with mrcfile.open(tmp_path / "J10/extract/posed.mrc") as mrc:  # the control: opposite signs misalign them
        misaligned = np.mean([align_image(image, -p, -x, -y, apix)
                              for image, p, (x, y) in zip(mrc.data, psi, origin_angst, strict=True)], axis=0)
    assert np.corrcoef(misaligned.ravel(), canonical.ravel())[0, 1] < 0.6


# --- commands ------------------------------------------------------------------------------------------------

def test_preprocess_of_a_cs_writes_a_relion31_star(project, tmp_path, capsys):
    out = tmp_path / "prep"
    code, lines = run(["preprocess", str(project["cs"]), "--datadir", str(project["root"]), "-o", str(out)], capsys)
    assert code == 0, lines
    star = read_star(out / "particles.star")
    assert star.version == 30001 and list(star.blocks) == ["optics", "particles"]
    assert star["optics"]["rlnVoltage"].astype(float).tolist() == [300.0, 200.0]
    rows = star["particles"]
    np.testing.assert_allclose(rows["rlnDefocusU"].astype(float), project["values"]["ctf/df1_A"])
    assert rows["rlnOpticsGroup"].tolist() == ["1", "2", "1", "2", "1"]
    with open_particles(out / "particles.star") as prepared:
        assert len(prepared) == 5 and prepared.stack_paths == [out / "particles.mrcs"]
        np.testing.assert_allclose(prepared.pixel_sizes, [1.1, 1.3, 1.1, 1.3, 1.1], rtol=1e-6)


def test_subset_of_a_2d_classification_cs(tmp_path, capsys):
    images = np.random.default_rng(5).normal(size=(4, BOX, BOX)).astype(np.float32)
    write_mrc(tmp_path / "J10/extract/a.mrc", images, apix=1.0)
    cs = save_cs(tmp_path / "J20/J20_020_particles.cs", BLOB + ALIGNMENTS2D,
                 {"blob/path": [b">J10/extract/a.mrc"] * 4, "blob/idx": [3, 2, 1, 0], "blob/psize_A": 1.0,
                  "blob/shape": np.full((4, 2), BOX), "alignments2D/class": [1, 0, 1, 2]})
    out = tmp_path / "class2.star"
    code, lines = run(["subset", str(cs), "--classes", "2", "-o", str(out)], capsys)
    assert code == 0 and lines == [f"kept 2 of 4 particles; wrote {out}"], lines
    with open_particles(out) as chosen:
        np.testing.assert_array_equal(chosen.read([0, 1]), images[[3, 1]])


# --- errors --------------------------------------------------------------------------------------------------

def without(fields, name):
    return [field for field in fields if field[0] != name]


def assert_one_line_error(capsys, tmp_path, path, *fragments):
    code, lines = run(["preprocess", str(path), "-o", str(tmp_path / "prep")], capsys)
    assert code == EXIT_DATA and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: ") and all(fragment in lines[0] for fragment in fragments), lines
    assert not (tmp_path / "prep").exists()


@pytest.mark.parametrize(("missing", "fragment"), [("blob/path", "no blob/path field"),
                                                    ("blob/idx", "no blob/idx field")])
def test_cs_without_image_fields(project, tmp_path, capsys, missing, fragment):
    cs = save_cs(tmp_path / "passthrough.cs", without(BLOB + CTF, missing),
                 {name: value for name, value in project["values"].items() if name.startswith("ctf/")}, n=5)
    assert_one_line_error(capsys, tmp_path, cs, fragment, "not a particle dataset with images")


def test_truncated_cs(project, tmp_path, capsys):
    raw = project["cs"].read_bytes()
    cs = tmp_path / "cut.cs"
    cs.write_bytes(raw[:-100])
    assert_one_line_error(capsys, tmp_path, cs, "truncated: its header says 5 records")


def test_corrupt_cs_header(project, tmp_path, capsys):
    raw = bytearray(project["cs"].read_bytes())
    raw[12:40] = b"x" * 28  # inside the header's dictionary
    cs = tmp_path / "garbled.cs"
    cs.write_bytes(bytes(raw))
    assert_one_line_error(capsys, tmp_path, cs, "not a readable cryoSPARC .cs file")


def test_cs_suffix_without_numpy_content(tmp_path, capsys):
    cs = tmp_path / "text.cs"
    cs.write_text("uid,blob/path\n1,a.mrc\n")
    assert_one_line_error(capsys, tmp_path, cs, "not a cryoSPARC .cs file", "this one begins b'uid,blob/path\\n1,'")


def test_cs_of_python_objects_is_not_unpickled(tmp_path, capsys):
    cs = tmp_path / "objects.cs"
    with open(cs, "wb") as handle:
        np.save(handle, np.array([("a.mrc", 0)], dtype=[("blob/path", "O"), ("blob/idx", "<u4")]))
    assert_one_line_error(capsys, tmp_path, cs, "holds Python objects")


def test_stack_not_found_names_the_paths_tried(project, tmp_path, capsys):
    moved = shutil.copy(project["cs"], tmp_path / "elsewhere.cs")  # outside the project: its paths lead nowhere
    assert_one_line_error(capsys, tmp_path, moved, "row 1: stack 'J10/extract/mic1_particles.mrc' not found "
                          f"relative to {tmp_path}, the folders above it or the working directory",
                          "give the cryoSPARC project directory with --datadir")
    code, lines = run(["preprocess", str(moved), "--datadir", str(tmp_path), "-o", str(tmp_path / "prep")], capsys)
    assert code == EXIT_DATA and lines == [
        f"error: {moved}: row 1: stack 'J10/extract/mic1_particles.mrc' not found as "
        f"{tmp_path / 'J10/extract/mic1_particles.mrc'} nor as {tmp_path / 'mic1_particles.mrc'} (give the cryoSPARC "
        "project directory with --datadir)"]


def test_image_index_past_the_end_of_its_stack(project, tmp_path, capsys):
    values = dict(project["values"], **{"blob/idx": [4, 0, 1, 3, 0]})  # mic2 holds 3 images
    cs = save_cs(project["root"] / "J10" / "bad.cs", BLOB + CTF + LOCATION, values)
    assert_one_line_error(capsys, tmp_path, cs, "row 4: image 4 is past the end of "
                                                "'J10/extract/mic2_particles.mrc' (3 images)")


def test_field_of_the_wrong_shape(tmp_path):
    fields = [("blob/path", "S8"), ("blob/idx", "<u4"), ("alignments2D/pose", "<f4", (3,))]
    cs = save_cs(tmp_path / "odd.cs", fields, {"blob/path": [b"a.mrc"], "blob/idx": [0]})
    with pytest.raises(InputError, match=r"field alignments2D/pose has shape \(1, 3\), expected \(1,\)"):
        read_cryosparc(cs)


@pytest.mark.parametrize("kind", ["png", "binary"])
def test_file_of_an_unknown_kind_says_what_is_expected(tmp_path, capsys, kind):
    if kind == "png":
        path = tmp_path / "particles.png"
        matplotlib.image.imsave(path, np.random.default_rng(0).random((40, 40)))
    else:
        path = tmp_path / "particles.dat"
        path.write_bytes(np.random.default_rng(0).integers(1, 256, 4096, dtype=np.uint8).tobytes())
    assert_one_line_error(capsys, tmp_path, path, "not a particle file: expected a RELION/Topaz STAR file, an "
                                                  "MRC/MRCS stack or a cryoSPARC .cs file")
