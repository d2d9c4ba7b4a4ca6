//! Host-side cost per FUSE request (see the report in INTEGRATION.md).
