-- The extra engine arguments an instance was started with (JSON array; NULL:
-- none): a deployment's engine_args, so a change of them is rolled out.
ALTER TABLE instances ADD COLUMN engine_args TEXT;
