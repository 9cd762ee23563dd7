"""HL7 v2 text: the message model, paths, escapes, character sets, batches."""
