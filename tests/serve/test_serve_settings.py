"""The Serve settings, the config file ``serve deploy`` reads, and the upload parser: no Ray needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lxn_ray.images.decode import ImageRejected
from lxn_ray.serving.serve import build_app
from lxn_ray.serving.settings import ServeSettings
from lxn_ray.serving.uploads import InputError, parse_multipart, rejected_image

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_file_builds_the_application(tmp_path):
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    (application,) = config["applications"]
    assert application["import_path"] == "lxn_ray.serving.serve:build_app"
    settings = ServeSettings.from_mapping(application["args"])
    assert settings == ServeSettings(storage=application["args"]["storage"])  # documented defaults
    assert isinstance(build_app({**application["args"], "storage": str(tmp_path)}), Application)
    with pytest.raises(ValueError, match="unknown serve settings"):
        ServeSettings.from_mapping({"storage": "x", "replicas": 3})


def test_settings_refuse_inconsistent_values():
    settings = ServeSettings(storage="s", min_replicas=2, max_replicas=3, gpus_per_replica=1)
    options = settings.deployment_options()
    assert options["autoscaling_config"]["min_replicas"] == 2
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    for bad in (
        dict(min_replicas=3, max_replicas=2),
        dict(target_ongoing_requests=64),  # above max_ongoing_requests
        dict(max_batch_size=0),
        dict(port=0),
        dict(route_prefix="api"),
        dict(cpus_per_replica=-1),
    ):
        with pytest.raises(ValueError):
            ServeSettings(storage="s", **bad)


def test_multipart_parser_and_error_mapping():
    body = (
        b'preamble\r\n--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a b.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--X\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="note"\r\n\r\nhi\r\n--XyZ--\r\nepilogue'
    )
    first, second = parse_multipart(body, 'multipart/form-data; boundary="XyZ"')
    assert (first.name, first.filename, first.content_type, first.data) == (
        "file",
        "a b.png",
        "image/png",
        b"\x89PNG\r\n--X",
    )
    assert (second.name, second.data) == ("note", b"hi")
    for broken, content_type in (
        (body, "multipart/form-data"),  # no boundary
        (body[: body.index(b"--XyZ--")], "multipart/form-data; boundary=XyZ"),  # truncated
        (b"no parts at all", "multipart/form-data; boundary=XyZ"),
    ):
        with pytest.raises(InputError) as caught:
            parse_multipart(broken, content_type)
        assert caught.value.status == 400
    assert rejected_image(ImageRejected("image is 9x9 pixels, over the 5-pixel cap")).status == 413
    assert rejected_image(ImageRejected("not a PNG, JPEG or DICOM file")).status == 415
    assert rejected_image(ImageRejected("corrupt image: truncated")).status == 400


@pytest.mark.parametrize(
    ("auc_ci", "flagged"), [([0.33, 0.62], True), ([0.5, 0.7], True), (None, True), ([0.62, 0.81], False)]
)
def test_every_answer_of_a_model_no_better_than_chance_says_so(auc_ci, flagged):
    """The answer /predict and /predict/batch return, for a card whose test AUC interval includes 0.5
    (or that has none), carries the flag and a warning; a model better than chance carries neither."""
    from lxn_ray.serving.model import LoadedModel

    card = {"test": {"auc": 0.48 if flagged else 0.7, "auc_ci": auc_ci}, "task": {"name": "covid-vs-rest"}}
    model = LoadedModel("m1", card, 0.5, 32, None, forward=lambda images: images, explainer=None)
    answer = model.prediction(0.2)
    assert answer["no_better_than_chance"] is flagged
    if flagged:
        assert answer["warning"].startswith("model m1 is no better than chance")
        assert ("includes 0.5" if auc_ci else "no test AUC") in answer["warning"]
    else:
        assert answer["warning"] is None
    assert answer["label"] == "negative" and answer["task"] == "covid-vs-rest"
