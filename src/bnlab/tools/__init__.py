"""Operations on whole models that use BN. Each says whether it mutates the model or returns a new one."""
