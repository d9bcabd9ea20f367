-- Runs once, when the postgres volume is first initialised: the database of MLflow's users and
-- permissions (basic_auth.ini, database_uri). The tracking data go to POSTGRES_DB (mlflow).
CREATE DATABASE mlflow_auth;
