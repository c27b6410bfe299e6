"""Where rows and bytes come from: transports (folder, git, HTTP, S3), one layout class per source
shape over a shared base, the ieee8023 metadata, and tasks (the only place a finding becomes a label)."""
