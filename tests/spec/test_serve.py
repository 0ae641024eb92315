"""ServeConfig and model metadata validation: bad values name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from medkd.registry.metadata import ModelMetadata
from medkd.spec.serve import ServeConfig


def errors(exc: ValidationError) -> dict[str, str]:
    return {".".join(str(part) for part in item["loc"]): item["msg"] for item in exc.errors()}


def test_defaults_map_to_ray_serve_options():
    config = ServeConfig()
    assert config.autoscaling_config() == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 5,
        "downscale_delay_s": 30,
        "look_back_period_s": 30.0,
        "metrics_interval_s": 10.0,
    }
    assert config.ray_actor_options() == {"num_cpus": 0.5, "num_gpus": 0}
    assert config.local_url() == "http://127.0.0.1:8000"
    assert ServeConfig(host="0.0.0.0", port=9000, route_prefix="/medkd").local_url() == "http://127.0.0.1:9000/medkd"


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas", "must be >= min_replicas (3), got 2"),
        ({"max_batch_size": 64}, "max_batch_size", "must be <= max_ongoing_requests (32), got 64"),
        ({"route_prefix": "medkd"}, "route_prefix", "must start with '/'"),
        ({"route_prefix": "/medkd/"}, "route_prefix", "must not end with '/'"),
        ({"port": 0}, "port", "greater than or equal to 1"),
        ({"cpus_per_replica": -1}, "cpus_per_replica", "greater than or equal to 0"),
        ({"replicas": 2}, "replicas", "Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_the_field(kwargs, field, message):
    with pytest.raises(ValidationError) as error:
        ServeConfig(**kwargs)
    found = errors(error.value)
    assert field in found and message in found[field], found


def test_scale_to_zero_starts_with_one_replica():
    assert ServeConfig(min_replicas=0).autoscaling_config()["initial_replicas"] == 1


def metadata(**changes) -> dict:
    base = {
        "model_id": "m",
        "task": "classification",
        "num_classes": 2,
        "class_names": ["a", "b"],
        "input": {"in_channels": 3, "spatial_dims": 2, "image_size": [28, 28], "mean": [0.5], "std": [0.5]},
        "teachers": [],
    }
    base.update(changes)
    return base


def test_metadata_keeps_lineage_and_names_bad_fields():
    parsed = ModelMetadata.model_validate(metadata())
    assert parsed.teachers == [] and parsed.label(1) == "b"
    assert ModelMetadata.model_validate(metadata(class_names=None)).label(1) == "1"
    bad = metadata(
        class_names=["a"],
        input={"in_channels": 3, "spatial_dims": 3, "image_size": [28, 28], "mean": [0.1, 0.2], "std": [-1]},
    )
    with pytest.raises(ValidationError) as error:
        ModelMetadata.model_validate(bad)
    found = errors(error.value)
    assert found["class_names"] == "has 1 names but num_classes is 2"
    assert found["input.image_size"] == "has 2 sizes but spatial_dims is 3"
    assert found["input.mean"] == "needs 1 or in_channels (3) values, got 2"
    assert "every std must be > 0" in found["input.std"]
