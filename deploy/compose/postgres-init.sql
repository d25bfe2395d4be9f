-- Runs once, when the postgres-data volume is empty (docker-entrypoint-initdb.d).
-- Each node keeps its own copy of the audit log, so each gets its own database; the
-- nodes create their tables (Alembic migrations) on first start.
CREATE DATABASE fedraft_audit_n1 OWNER fedraft;
CREATE DATABASE fedraft_audit_n2 OWNER fedraft;
CREATE DATABASE fedraft_audit_n3 OWNER fedraft;
