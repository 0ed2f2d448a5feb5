"""Deploy side: S3 packaging, SageMaker endpoint lifecycle, client, local stand-in. Never imports torch."""
