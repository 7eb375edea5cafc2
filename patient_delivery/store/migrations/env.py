"""Alembic environment: run with the connection handed over by `patient_delivery.store.schema`."""

from alembic import context

from patient_delivery.store.models import Base

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
