"""The APIs: mnist.v1 (servicer, codec), KServe v2 (oip, oip_codec, oip_config,
oip_statistics) and admin; each hands request bytes to the data plane and maps domain errors to
statuses. No front end is imported here (docs/architecture.md)."""
