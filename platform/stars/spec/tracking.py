"""The `tracking` section: the MLflow tracking store and experiment."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from stars.spec.base import Float, Section

__all__ = ["TrackingSpec"]

_CREDENTIALS_IN_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*:[^/@]*@")


class TrackingSpec(Section):
    """MLflow tracking."""

    enabled: bool = True
    """Log to MLflow (false: no tracking at all, e.g. quick local tests)."""
    uri: str | None = None
    """Tracking URI, e.g. `http://mlflow.internal:5000`. null = $MLFLOW_TRACKING_URI if set, else
    the local store `sqlite:///<working dir>/mlflow.db`. Credentials go in MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, never in the URI."""
    artifact_location: str | None = None
    """Artifact root of a newly created experiment; null = `<working dir>/mlruns` for a local store,
    the server's default otherwise."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra tags on every run of the job."""
    flush_timeout_s: Float = Field(default=300.0, ge=0, le=86_400)
    """Training never waits for MLflow: its metrics go to a journal next to the checkpoints and are sent
    in the background, retried while the server is down. At the end of training, wait at most this
    long for the rest to be sent; what is still unsent stays in the journal, is sent when the job is
    resumed, or by `starsctl sync <run directory>`."""

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and _CREDENTIALS_IN_URI.match(value):
            raise ValueError(
                "put credentials in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN), not in the URI"
            )
        if value is not None and not value.strip():
            raise ValueError("must not be empty (use null for the default local store)")
        return value
