"""Body model: synthetic SMPL-format files, smplx loading, joint sets, errors."""
import os
import pickle
import shutil
import threading

import numpy as np
import pytest
import smplx
import torch
from conftest import REPO

from raytrain.body import (
    H36M_FLIP_PERM,
    H36M_TO_J14,
    J24_FLIP_PERM,
    J24_NAMES,
    SMPL_JOINT_FLIP_PERM,
    SMPL_PARENTS,
    SMPL_POSE_FLIP_PERM,
    BodyModelError,
    ensure_body_model_dir,
    flip_smpl_pose,
    load_body_model,
    load_mean_params,
)
from raytrain.body.model import GENDER_FILES, REQUIRED_FILES
from raytrain.synthetic.body_model import default_body_model_dir, write_synthetic_body_model

SMALL_FILES = ("J_regressor_h36m.npy", "smpl_mean_params.npz")


@pytest.fixture(scope="module")
def body_dir(tmp_path_factory):
    return write_synthetic_body_model(tmp_path_factory.mktemp("body") / "seed0", seed=0)


@pytest.fixture(scope="module")
def model(body_dir):
    return load_body_model(body_dir, genders=("neutral", "male", "female"))


def _read(path):
    with open(path, "rb") as fh:
        return pickle.load(fh)


def _random_pose(n, scale=0.3, seed=0):
    return torch.randn(n, 72, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------- synthetic files


def test_synthetic_loads_through_smplx(body_dir):
    smpl = smplx.SMPL(str(body_dir), gender="neutral")
    out = smpl(betas=torch.zeros(2, 10), body_pose=torch.zeros(2, 69),
               global_orient=torch.zeros(2, 3))
    assert out.vertices.shape == (2, 6890, 3)
    assert out.joints.shape == (2, 24 + 21, 3)          # + smplx's vertex-selected joints
    assert torch.isfinite(out.vertices).all()


def test_pickle_has_smpl_keys_and_shapes(body_dir):
    data = _read(body_dir / "SMPL_NEUTRAL.pkl")
    assert data["v_template"].shape == (6890, 3)
    assert data["f"].dtype == np.uint32 and data["f"].shape[1] == 3
    assert data["weights"].shape == (6890, 24)
    np.testing.assert_allclose(data["weights"].sum(1), 1.0, atol=1e-9)
    assert data["kintree_table"].shape == (2, 24)
    assert list(data["kintree_table"][0, 1:]) == list(SMPL_PARENTS[1:])
    assert data["J_regressor"].shape == (24, 6890) and hasattr(data["J_regressor"], "tocsr")
    np.testing.assert_allclose(np.asarray(data["J_regressor"].sum(1)).ravel(), 1.0, atol=1e-9)
    assert data["shapedirs"].shape == (6890, 3, 10)
    assert data["posedirs"].shape == (6890, 3, 207)
    assert data["J"].shape == (24, 3)


def test_mesh_is_closed_and_outward(body_dir):
    data = _read(body_dir / "SMPL_NEUTRAL.pkl")
    v, f = data["v_template"], data["f"].astype(np.int64)
    assert np.unique(f).size == 6890                     # every vertex is used
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()
    volume = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert 0.04 < volume < 0.12                          # m^3, a human body


def test_rest_shape_is_plausible(body_dir):
    data = _read(body_dir / "SMPL_NEUTRAL.pkl")
    v, joints = data["v_template"], data["J"]
    height = v[:, 1].max() - v[:, 1].min()
    assert 1.55 < height < 1.9
    assert np.linalg.norm(joints[0]) < 0.1               # pelvis near the origin
    assert joints[15, 1] > joints[12, 1] > joints[0, 1] > joints[4, 1] > joints[7, 1]
    assert joints[1, 0] > 0 > joints[2, 0]               # the left side is +x
    assert joints[20, 0] > joints[18, 0] > joints[16, 0]  # T-pose arms along x
    assert abs(v[:, 0].max() + v[:, 0].min()) < 1e-6     # left/right symmetric


def test_first_shape_coefficient_is_not_a_uniform_scale(body_dir):
    """As SMPL's, the first coefficient changes proportions with height: a body's size is
    then not the same picture as its distance to the camera."""
    data = _read(body_dir / "SMPL_NEUTRAL.pkl")
    v, first = data["v_template"], data["shapedirs"][:, :, 0]
    centred = v - v.mean(axis=0)
    k = float((centred * first).sum() / (centred * centred).sum())   # best uniform scale about the centroid
    residual = np.linalg.norm(first - first.mean(axis=0) - k * centred) / np.linalg.norm(first)
    assert k > 0 and residual > 0.2, (k, residual)                    # taller, and not just larger
    joints, tall = data["J"], np.asarray(data["J_regressor"] @ (v + 2.0 * first))  # (24, 3) each
    leg, torso = (lambda j: j[4, 1] - j[7, 1]), (lambda j: j[12, 1] - j[0, 1])
    assert leg(tall) / torso(tall) > leg(joints) / torso(joints) + 0.01  # longer legs for the height


def test_gender_variants_differ(body_dir):
    heights = {g: np.ptp(_read(body_dir / name)["v_template"][:, 1])
               for g, name in GENDER_FILES.items()}
    assert heights["male"] > heights["neutral"] > heights["female"]


def test_landmark_vertices_are_anatomical(body_dir):
    v = _read(body_dir / "SMPL_NEUTRAL.pkl")["v_template"]
    ids = smplx.vertex_ids.vertex_ids["smplh"]
    p = {name: v[i] for name, i in ids.items()}
    head = v[v[:, 1] > p["nose"][1] - 0.1]
    assert p["nose"][2] > head[:, 2].max() - 0.01       # frontmost point of the face
    assert p["leye"][0] > 0 > p["reye"][0] and p["leye"][1] > p["nose"][1]
    assert p["lear"][0] > p["leye"][0] and p["rear"][0] < p["reye"][0]
    for side, sign in (("L", 1), ("R", -1)):
        assert p[side + "BigToe"][2] > p[side + "Heel"][2] + 0.15
        assert sign * (p[side + "SmallToe"][0] - p[side + "BigToe"][0]) > 0
        assert p[side + "Heel"][1] < -0.9
    for finger in ("thumb", "index", "middle", "ring", "pinky"):
        assert p["l" + finger][0] > 0.65 and p["r" + finger][0] < -0.65
    assert p["lthumb"][2] > p["lindex"][2] > p["lpinky"][2]   # thumb forward, palms down


def test_h36m_regressor(body_dir, model):
    reg = np.load(body_dir / "J_regressor_h36m.npy")
    assert reg.shape == (17, 6890) and (reg >= 0).all()
    np.testing.assert_allclose(reg.sum(1), 1.0, atol=1e-6)
    out = model.forward_axis_angle(torch.zeros(1, 72), torch.zeros(1, 10))
    h36m = out.joints_h36m[0]
    assert h36m.shape == (17, 3)
    assert h36m[1, 0] > 0 > h36m[4, 0]                    # lhip / rhip
    assert h36m[10, 1] == h36m[:, 1].max()                # head top
    assert h36m[3, 1] < h36m[2, 1] < h36m[1, 1] < h36m[7, 1] < h36m[8, 1]


def test_mean_params(body_dir):
    params = load_mean_params(body_dir)
    assert params["pose"].shape == (144,) and params["shape"].shape == (10,)
    assert params["cam"].tolist() == pytest.approx([0.9, 0.0, 0.0])
    cols = params["pose"].reshape(24, 2, 3)               # (a1, a2) per joint
    torch.testing.assert_close(cols.norm(dim=-1), torch.ones(24, 2))
    torch.testing.assert_close((cols[:, 0] * cols[:, 1]).sum(-1), torch.zeros(24), atol=1e-6,
                               rtol=0)
    assert cols[0, 1, 1] < -0.99                          # root rotated by pi about x


def test_same_seed_same_files(body_dir, tmp_path):
    again = write_synthetic_body_model(tmp_path / "again", seed=0)
    for name in (*GENDER_FILES.values(), "J_regressor_h36m.npy"):
        assert (body_dir / name).read_bytes() == (again / name).read_bytes(), name
    with np.load(body_dir / "smpl_mean_params.npz") as a, np.load(again / "smpl_mean_params.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    other = _read(write_synthetic_body_model(tmp_path / "seed1", seed=1) / "SMPL_NEUTRAL.pkl")
    base = _read(body_dir / "SMPL_NEUTRAL.pkl")
    assert not np.array_equal(other["posedirs"], base["posedirs"])
    np.testing.assert_array_equal(other["v_template"], base["v_template"])


# --------------------------------------------------------------------------- BodyModel


def test_body_model_output_shapes(model):
    out = model(torch.eye(3).expand(3, 24, 3, 3), torch.zeros(3, 10))
    assert out.vertices.shape == (3, 6890, 3)
    assert out.joints_smpl.shape == (3, 24, 3)
    assert out.joints_h36m.shape == (3, 17, 3)
    assert out.joints_j24.shape == (3, len(J24_NAMES), 3)
    assert model.faces.dtype == np.int64 and model.faces.shape[1] == 3
    assert len(model.state_dict()) == 0 and len(list(model.parameters())) == 0


def test_joints_move_with_pose_and_betas(model):
    zero_pose, zero_betas = torch.zeros(1, 72), torch.zeros(1, 10)
    rest = model.forward_axis_angle(zero_pose, zero_betas)
    bent = zero_pose.clone()
    bent[0, 18 * 3 + 1] = -1.2                            # left elbow
    posed = model.forward_axis_angle(bent, zero_betas)
    moved = (posed.joints_smpl - rest.joints_smpl).norm(dim=-1)[0]
    assert moved[20] > 0.1 and moved[22] > 0.1            # wrist and hand follow
    assert moved[:18].max() < 1e-5 and moved[19] < 1e-5  # the rest stays put
    tall = model.forward_axis_angle(zero_pose, torch.tensor([[2.0] + [0.0] * 9]))
    rest_height = np.ptp(rest.vertices[0, :, 1].numpy())
    assert np.ptp(tall.vertices[0, :, 1].numpy()) > rest_height + 0.05
    for k in range(10):
        betas = torch.zeros(1, 10)
        betas[0, k] = 1.0
        delta = model.forward_axis_angle(zero_pose, betas).vertices - rest.vertices
        assert delta.norm(dim=-1).max() > 0.005, f"beta {k} does nothing"


def test_j24_assembly(model):
    out = model.forward_axis_angle(_random_pose(2), torch.zeros(2, 10))
    j24, h36m = out.joints_j24, out.joints_h36m
    torch.testing.assert_close(j24[:, :14], h36m[:, list(H36M_TO_J14)])
    torch.testing.assert_close(j24[:, 14], h36m[:, 0])
    rest = model.forward_axis_angle(torch.zeros(1, 72), torch.zeros(1, 10)).joints_j24[0]
    names = dict(zip(J24_NAMES, rest))
    assert names["head_top"][1] > names["leye"][1] > names["nose"][1] > names["neck"][1]
    assert names["lear"][0] > 0 > names["rear"][0] and names["nose"][2] > names["head"][2]


def test_gendered_forward_groups_samples(model):
    pose, betas = _random_pose(3, seed=1), torch.randn(3, 10) * 0.5
    mixed = model.forward_axis_angle(pose, betas, gender=["male", "neutral", "female"])
    for i, g in enumerate(["male", "neutral", "female"]):
        single = model.forward_axis_angle(pose[i:i + 1], betas[i:i + 1], gender=g)
        for a, b in zip(mixed, single):
            torch.testing.assert_close(a[i:i + 1], b)
    with pytest.raises(ValueError):
        load_body_model(model.smpl_dir).forward_axis_angle(pose[:1], betas[:1], gender="male")


def test_gradients_flow(model):
    betas = torch.zeros(2, 10, requires_grad=True)
    pose = _random_pose(2).requires_grad_(True)
    model.forward_axis_angle(pose, betas, gender=["male", "female"]).joints_j24.sum().backward()
    assert betas.grad.abs().sum() > 0 and pose.grad.abs().sum() > 0


# --------------------------------------------------------------------------- flips


def test_flip_permutations_are_involutions():
    for perm in (J24_FLIP_PERM, SMPL_POSE_FLIP_PERM, SMPL_JOINT_FLIP_PERM, H36M_FLIP_PERM):
        perm = np.asarray(perm)
        np.testing.assert_array_equal(perm[perm], np.arange(len(perm)))
    assert len(SMPL_POSE_FLIP_PERM) == 72
    pose = _random_pose(4)
    torch.testing.assert_close(flip_smpl_pose(flip_smpl_pose(pose)), pose)
    np.testing.assert_allclose(flip_smpl_pose(flip_smpl_pose(pose.numpy())), pose.numpy())


def test_flipped_pose_mirrors_joints(model):
    pose = _random_pose(2, scale=0.4, seed=3)
    joints = model.forward_axis_angle(pose, torch.zeros(2, 10)).joints_smpl
    flipped = model.forward_axis_angle(flip_smpl_pose(pose), torch.zeros(2, 10)).joints_smpl
    mirrored = joints[:, list(SMPL_JOINT_FLIP_PERM)] * torch.tensor([-1.0, 1.0, 1.0])
    torch.testing.assert_close(flipped, mirrored, atol=2e-4, rtol=0)


# --------------------------------------------------------------------------- directories


def test_default_body_model_dir_concurrent(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTRAIN_HOME", str(tmp_path))
    results, errors = [], []

    def call():
        try:
            results.append(default_body_model_dir())
        except Exception as exc:   # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    final = results[0]
    assert final == tmp_path / "body" / "synthetic-v2-seed0"           # generator version, seed
    assert sorted(os.listdir(final.parent)) == ["synthetic-v2-seed0"]  # no temp leftovers
    assert default_body_model_dir() == final
    assert load_mean_params(final)["pose"].shape == (144,)


def test_library_never_makes_a_body_model(tmp_path, monkeypatch):
    """Without a directory the library refuses, naming the key; it writes nothing."""
    monkeypatch.setenv("RAYTRAIN_HOME", str(tmp_path))
    for call in (lambda: ensure_body_model_dir(None), lambda: load_body_model(None), lambda: load_mean_params()):
        with pytest.raises(BodyModelError, match="model.smpl_dir is not set"):
            call()
    assert not any(tmp_path.iterdir())


def _user_dir(body_dir, tmp_path):
    """A user directory: links to the synthetic pickles, copies of the small files."""
    user = tmp_path / "user"
    user.mkdir()
    for name in GENDER_FILES.values():
        os.symlink(body_dir / name, user / name)
    for name in SMALL_FILES:
        shutil.copy(body_dir / name, user / name)
    return user


def test_user_dir_is_validated(body_dir, tmp_path):
    user = _user_dir(body_dir, tmp_path)
    assert ensure_body_model_dir(str(user)) == user
    with pytest.raises(BodyModelError, match="not found"):
        ensure_body_model_dir(str(tmp_path / "nowhere"))
    for name in REQUIRED_FILES:
        os.rename(user / name, user / (name + ".bak"))
        with pytest.raises(BodyModelError, match=name.replace(".", r"\.")):
            ensure_body_model_dir(str(user))
        os.rename(user / (name + ".bak"), user / name)


def test_missing_gender_file(body_dir, tmp_path):
    user = _user_dir(body_dir, tmp_path)
    os.remove(user / "SMPL_MALE.pkl")
    with pytest.raises(BodyModelError, match=r"SMPL_MALE\.pkl.*not found"):
        load_body_model(str(user), genders=("neutral", "male"))


def _bad_pickle(body_dir, tmp_path, content: bytes):
    user = _user_dir(body_dir, tmp_path)
    os.remove(user / "SMPL_NEUTRAL.pkl")
    (user / "SMPL_NEUTRAL.pkl").write_bytes(content)
    return user


@pytest.mark.parametrize("content, message", [
    (b"this is not a pickle", r"SMPL_NEUTRAL\.pkl in .*not a readable pickle"),
    (pickle.dumps({"v_template": np.zeros((6890, 3))}), r"SMPL_NEUTRAL\.pkl in .*missing key 'f'"),
    (pickle.dumps([1, 2, 3]), r"SMPL_NEUTRAL\.pkl in .*expected an SMPL model dict"),
])
def test_malformed_pickle(body_dir, tmp_path, content, message):
    user = _bad_pickle(body_dir, tmp_path, content)
    with pytest.raises(BodyModelError, match=message):
        load_body_model(str(user))


def test_pickle_with_wrong_shape(body_dir, tmp_path):
    data = _read(body_dir / "SMPL_NEUTRAL.pkl")
    data["posedirs"] = data["posedirs"][:, :, :100]
    user = _bad_pickle(body_dir, tmp_path, pickle.dumps(data))
    with pytest.raises(BodyModelError, match=r"SMPL_NEUTRAL\.pkl.*'posedirs' has shape"):
        load_body_model(str(user))


def test_h36m_regressor_wrong_shape(body_dir, tmp_path):
    user = _user_dir(body_dir, tmp_path)
    np.save(user / "J_regressor_h36m.npy", np.zeros((14, 6890)))
    with pytest.raises(BodyModelError,
                       match=r"J_regressor_h36m\.npy in .*expected shape \(17, 6890\), got \(14, 6890\)"):
        load_body_model(str(user))
    (user / "J_regressor_h36m.npy").write_bytes(b"garbage")
    with pytest.raises(BodyModelError, match=r"J_regressor_h36m\.npy in .*not a readable"):
        load_body_model(str(user))


def test_mean_params_malformed(body_dir, tmp_path):
    user = _user_dir(body_dir, tmp_path)
    np.savez(user / "smpl_mean_params.npz", pose=np.zeros(144), shape=np.zeros(10))
    with pytest.raises(BodyModelError, match=r"smpl_mean_params\.npz in .*missing array 'cam'"):
        load_mean_params(str(user))
    (user / "smpl_mean_params.npz").write_bytes(b"garbage")
    with pytest.raises(BodyModelError, match=r"smpl_mean_params\.npz in .*not a readable"):
        load_mean_params(str(user))


def test_error_is_one_line(body_dir, tmp_path):
    user = _bad_pickle(body_dir, tmp_path, b"\x80\x04garbage")
    with pytest.raises(BodyModelError) as info:
        load_body_model(str(user))
    assert "\n" not in str(info.value) and "SMPL_NEUTRAL.pkl" in str(info.value)


class _Planted:
    """Unpickling this runs code: a crafted model file."""

    def __reduce__(self):
        return (os.system, ("touch planted-by-pickle",))


def test_smpl_pickle_is_read_with_the_restricted_unpickler(body_dir, tmp_path, monkeypatch):
    """A crafted SMPL file that would run code is refused, naming the file and the
    global; the synthetic writer's numpy arrays and scipy sparse matrix still load."""
    monkeypatch.chdir(tmp_path)
    data = _read(body_dir / "SMPL_NEUTRAL.pkl")
    data["extra"] = _Planted()
    user = _bad_pickle(body_dir, tmp_path, pickle.dumps(data, protocol=2))
    with pytest.raises(BodyModelError, match=r"SMPL_NEUTRAL\.pkl in .*refused global posix\.system"):
        load_body_model(str(user))
    assert not (tmp_path / "planted-by-pickle").exists()
    from raytrain.safe_pickle import safe_load
    for protocol in (2, 4):
        (tmp_path / "p.pkl").write_bytes(pickle.dumps(_read(body_dir / "SMPL_MALE.pkl"), protocol=protocol))
        loaded = safe_load(tmp_path / "p.pkl", allow_sparse=True)
        assert type(loaded["J_regressor"]).__name__ == "csc_matrix"
        assert loaded["v_template"].shape == (6890, 3)


def test_a_crafted_build_never_sets_attributes_of_a_class(body_dir, tmp_path):
    """BUILD on the sparse class itself (not an instance) would replace its methods for the
    whole process: the restricted unpickler refuses it, naming the file, in one line."""
    import scipy.sparse
    before = scipy.sparse.csr_matrix.toarray
    crafted = (b"\x80\x02cscipy.sparse\ncsr_matrix\n" + b"N}X\x07\x00\x00\x00toarrayK\x01s\x86b.")
    user = _bad_pickle(body_dir, tmp_path, crafted)
    with pytest.raises(BodyModelError, match=r"SMPL_NEUTRAL\.pkl in .*BUILD on scipy\.sparse.*csr_matrix") as info:
        load_body_model(str(user))
    assert "\n" not in str(info.value)
    assert scipy.sparse.csr_matrix.toarray is before
    function = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n" + b"N}X\x0c\x00\x00\x00__defaults__)s\x86b.")
    (tmp_path / "f.pkl").write_bytes(function)
    from raytrain.safe_pickle import UnsafePickleError, safe_load
    with pytest.raises(UnsafePickleError, match="BUILD on numpy"):
        safe_load(tmp_path / "f.pkl")


@pytest.mark.parametrize("gender, damage, message", [
    ("neutral", lambda d: d["weights"].__setitem__((0, 0), np.nan), "'weights' holds NaN"),
    ("male", lambda d: d["kintree_table"].__setitem__((0, 5), 9), "'kintree_table' names a parent"),
    ("female", lambda d: d.update(f=d["f"] + 10_000), "'f' names vertices outside"),
    ("neutral", lambda d: d.update(v_template=np.full((6890, 3), "x")), "'v_template' holds <U1 values"),
])
def test_smpl_files_that_exist_but_do_not_load_stop_raytrain_train_before_ray(
        body_dir, tmp_path, gender, damage, message, synthetic_shards):
    """A damaged SMPL file of any gender: `raytrain train` loads the body model once before
    Ray starts and exits 2 with one line naming the file."""
    import contextlib
    import io

    import ray

    from raytrain.cli import main as cli_main
    train, val = synthetic_shards
    user = _user_dir(body_dir, tmp_path)
    data = _read(body_dir / GENDER_FILES[gender])
    data = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in data.items()}
    damage(data)
    os.remove(user / GENDER_FILES[gender])
    (user / GENDER_FILES[gender]).write_bytes(pickle.dumps(data, protocol=2))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["train", "--config", str(REPO / "configs" / "demo.yaml"),
                         f"model.smpl_dir={user}", f"train.storage_path={tmp_path / 'runs'}",
                         f"data.train_shards={train}", f"data.val_shards={val}", "model.backbone=resnet18"])
    line = err.getvalue().strip()
    assert code == 2 and not ray.is_initialized(), line
    assert "\n" not in line and f"{GENDER_FILES[gender]} in " in line and message in line, line
