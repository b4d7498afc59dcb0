//! The audit log. Being built: see the audit issue.
