"""A Google Cloud Storage endpoint on localhost for tests/test_object_store.py.

`python -m tests.gcs_emulator PORT` serves `gcp-storage-emulator` in memory with a bucket
named `bucket`. The emulator leaves out the `x-goog-generation` header of a download, which
TensorStore's GCS driver (Orbax's array writer) reads to version what it cached; it is added
here from the object's own metadata. Clients find the endpoint through `environment(url)`.
"""

from __future__ import annotations

import sys
import time

BUCKET = "bucket"


def environment(url: str) -> dict[str, str]:
  """The variables that send each client to `url`: gcsfs and google-cloud-storage
  (`etils.epath`, tensorboardX) and TensorStore (Orbax), with a placeholder token."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
      "GOOGLE_CLOUD_PROJECT": "test-project",
      # gcsfs would first ask the storage control API (gRPC, not emulated) for the bucket's
      # layout, retrying for a minute per bucket.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def _with_generation_headers():
  from gcp_storage_emulator.handlers import objects

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status < 300:  # whole or ranged reads
      bucket, name = request.params["bucket_name"], request.params["object_id"]
      meta = storage.get_file_obj(bucket, name)
      response["x-goog-generation"] = meta["generation"]
      response["x-goog-metageneration"] = meta["metageneration"]

  objects.download = download_with_generation  # before the server's routes are built


def main(port: int) -> None:
  _with_generation_headers()
  from gcp_storage_emulator.server import create_server

  server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  print("serving", flush=True)
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  main(int(sys.argv[1]))
