"""Object storage, model versions, the production pointer and the promotion gate.

Modules: `store` (S3 client), `seaweed` (embedded SeaweedFS for one machine), `versions`
(immutable versions, the production pointer, the promotion log), `gate` (should a challenger
replace production?). Import the submodules directly; nothing heavy is imported here.
"""

from __future__ import annotations
