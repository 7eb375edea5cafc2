"""The FHIR resource types the pull API serves: searched by REST and MCP, exported in bulk, and
the only ones a SMART scope may name."""

from __future__ import annotations

RESOURCE_TYPES = sorted({
    "AllergyIntolerance", "CarePlan", "CareTeam", "Claim", "Condition", "Coverage", "Device",
    "DiagnosticReport", "DocumentReference", "Encounter", "ExplanationOfBenefit", "Goal",
    "ImagingStudy", "Immunization", "Location", "Medication", "MedicationAdministration",
    "MedicationDispense", "MedicationRequest", "MedicationStatement", "Observation",
    "Organization", "Practitioner", "PractitionerRole", "Procedure", "Provenance",
    "ServiceRequest", "SupplyDelivery",
})  # fmt: skip
"""The R4 resource types of the Patient compartment that stored bundles carry: the only ones
the FHIR API and the MCP tools search."""

SERVED_TYPES = frozenset({"Patient", *RESOURCE_TYPES})
"""Every type a client may read: the patients, and what their bundles carry."""
