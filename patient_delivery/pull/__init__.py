"""Pull: organizations read their patients' records on demand, through FHIR R4 and MCP."""
