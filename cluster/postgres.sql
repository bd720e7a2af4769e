-- The shared evomerge study database. Run as a PostgreSQL superuser (or your managed DB's admin):
--   psql -h HOST -U postgres -v password="'CHANGE_ME'" -f cluster/postgres.sql
-- Then the study URL is postgresql://evomerge:CHANGE_ME@HOST:5432/evomerge (see cluster/postgres.md).
CREATE ROLE evomerge LOGIN PASSWORD :password;
CREATE DATABASE evomerge OWNER evomerge;
-- The owner may create tables in the public schema (PostgreSQL 15+ no longer lets every role do so);
-- Optuna creates its tables on the first connection.
\connect evomerge
GRANT ALL ON SCHEMA public TO evomerge;
