"""One way to make AWS clients for every deploy command.

boto3 already honours the standard environment (AWS_PROFILE, AWS_REGION /
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_<SERVICE>), which is
what lets the same commands run against moto or the local runtime in tests.
"""

from __future__ import annotations

import os
from typing import Any

from llava_sessions.errors import ConfigError


def session(region: str | None = None, profile: str | None = None):
    import boto3

    # botocore reads AWS_DEFAULT_REGION; the SDKs' newer AWS_REGION is honoured too.
    region = region or os.environ.get("AWS_REGION")
    boto_session = boto3.Session(region_name=region, profile_name=profile)
    if boto_session.region_name is None:
        raise ConfigError(
            "no AWS region: pass --region, or set AWS_REGION (or a region in your AWS profile)"
        )
    return boto_session


def client(service: str, region: str | None = None, profile: str | None = None,
           endpoint_url: str | None = None, **config: Any):
    """A boto3 client; ``config`` goes to botocore's Config (retries, timeouts)."""
    from botocore.config import Config

    boto_session = session(region, profile)
    return boto_session.client(
        service, endpoint_url=endpoint_url, config=Config(**config) if config else None
    )
