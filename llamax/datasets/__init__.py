"""tfds dataset builders owned by llamax. Importing a builder's package registers it with tfds."""
