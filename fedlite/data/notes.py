"""Clinical notes for the synthetic dataset.

How much a note reveals is set by ``detail``: "full" notes carry decisive numbers (blast counts,
marrow findings, often the stage), "partial" notes only overlapping blood counts, "vague" notes only
symptoms and history drawn the same way for both classes. Negatives talk about leukemia too ("rule
out leukemia", "no blasts seen"), so spotting the word does not give the label away.
"""

from __future__ import annotations

import numpy as np

DETAILS = ("full", "partial", "vague")
MIN_WORDS = 40
MAX_WORDS = 150

SYMPTOMS = (
    "fatigue", "easy bruising", "intermittent fever", "bone pain", "night sweats",
    "recurrent infections", "shortness of breath on exertion", "unintentional weight loss", "pallor",
    "bleeding gums", "headaches", "malaise", "reduced appetite", "joint aches", "frequent nosebleeds",
)
HISTORY = (
    "Past history of hypertension.", "No significant past medical history.",
    "Type 2 diabetes, diet controlled.", "Recent upper respiratory tract infection.",
    "Recently completed a course of antibiotics for a chest infection.", "Non-smoker, drinks rarely.",
    "Family history unremarkable.", "On no regular medications.", "Known asthma, well controlled.",
    "Previous appendicectomy.", "Takes a daily multivitamin.", "Ex-smoker, 10 pack-years.",
    "Recently returned from travel abroad.", "Lives with family, independent at baseline.",
    "Immunisations up to date.", "Mild iron deficiency noted two years ago.",
)
EXAM = (
    "On examination mild pallor, no lymphadenopathy palpable.", "Examination largely unremarkable.",
    "Temperature {temp} C, heart rate {hr}, blood pressure stable.", "Looks tired but alert and oriented.",
    "A few scattered bruises on the shins.", "Chest clear, abdomen soft and non-tender.",
    "Vitals: T {temp} C, HR {hr}.", "No rash; throat mildly erythematous.",
)
PLANS = (
    "Plan: FBC and peripheral smear, review with results.",
    "Bloods sent; will review once back.",
    "Referred to haematology to rule out leukemia.",
    "Haematology opinion requested to exclude a haematological malignancy.",
    "Repeat blood count in two weeks.",
    "Safety-netting advice given; return if worse.",
    "Rule out leukemia versus reactive process.",
    "Follow up in clinic next week.",
)
DURATIONS = ("several days", "a week", "two weeks", "3 weeks", "about a month", "6 weeks", "two months")
MYELOID_MARKERS = ("CD34", "CD117", "MPO", "CD13", "CD33", "HLA-DR")
LYMPHOID_MARKERS = ("CD19", "CD10", "CD79a", "TdT", "CD22", "CD34")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


def write_note(rng: np.random.Generator, leukemia: int, stage: int | None, lineage: str | None,
               detail: str, num_stages: int = 4) -> str:
    """One clinical note; all randomness comes from ``rng``."""
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {DETAILS}, got {detail!r}")
    if leukemia and stage is None:
        raise ValueError("a positive case needs a stage")
    severity = stage / max(num_stages - 1, 1) if leukemia else 0.0
    child = _is_child(rng, leukemia, lineage)
    core = [_presentation(rng, child)]
    histories = [HISTORY[i] for i in rng.choice(len(HISTORY), size=2 if detail == "vague" else 1, replace=False)]
    optional = histories + [_exam(rng)]
    if detail == "vague":
        closing = [_pick(rng, PLANS)]
    elif detail == "partial":
        core.append(_blood_counts(rng, _lab_values(rng, leukemia, severity), partial=True))
        closing = [_pick(rng, ("Peripheral smear sent for review.", "Film report pending.",
                               "Smear to be reviewed by haematology.", "Flow cytometry pending.",
                               "Bone marrow biopsy scheduled.")), _pick(rng, PLANS)]
    else:
        core += _full_findings(rng, leukemia, stage, lineage, severity)
        closing = []
    sentences = _arrange(rng, core, optional, closing)
    return _fit_length(rng, sentences, optional)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _is_child(rng: np.random.Generator, leukemia: int, lineage: str | None) -> bool:
    # Lymphoblastic disease is commoner in children: age is a weak lineage hint, never a label.
    if leukemia and lineage == "lymphoid":
        return rng.random() < 0.45
    return rng.random() < (0.1 if leukemia else 0.25)


def _presentation(rng: np.random.Generator, child: bool) -> str:
    age = int(rng.integers(2, 17)) if child else int(rng.integers(18, 88))
    female = rng.random() < 0.5
    noun = ("girl" if female else "boy") if child else ("woman" if female else "man")
    sex = "female" if female else "male"
    count = int(rng.integers(1, 4))
    picked = [SYMPTOMS[i] for i in rng.choice(len(SYMPTOMS), size=count, replace=False)]
    symptoms = picked[0] if count == 1 else ", ".join(picked[:-1]) + " and " + picked[-1]
    duration = _pick(rng, DURATIONS)
    form = int(rng.integers(5))
    if form == 0:
        return f"{age}-year-old {noun} presenting with {symptoms} over {duration}."
    if form == 1:
        return f"Patient is a {age} y/o {sex[0].upper()} who reports {symptoms} for {duration}."
    if form == 2:
        return f"{sex.capitalize()}, aged {age}, referred by GP with {symptoms}."
    if form == 3:
        return f"A {age}-year-old {sex} seen in clinic with {duration} of {symptoms}."
    return f"Presenting complaint: {symptoms} ({duration}). {age} years old, {sex}."


def _exam(rng: np.random.Generator) -> str:
    temp = f"{rng.normal(37.3, 0.6):.1f}"
    return _pick(rng, EXAM).format(temp=temp, hr=int(rng.integers(64, 112)))


def _lab_values(rng: np.random.Generator, leukemia: int, severity: float) -> dict[str, float]:
    """Blood counts that drift with stage but overlap between neighbours and with negatives."""
    if leukemia:
        wbc = (rng.uniform(1.2, 3.5) if rng.random() < 0.2
               else float(np.exp(rng.normal(np.log(8.0) + 2.6 * severity, 0.55))))
        hb = rng.normal(11.5 - 3.0 * severity, 1.3)
        plt = rng.normal(170 - 120 * severity, 45)
        blood_blasts = rng.uniform(-12, 12) + 10 + 60 * severity
        marrow_blasts = rng.uniform(-13, 13) + 25 + 60 * severity
    else:
        wbc = rng.uniform(11, 22) if rng.random() < 0.15 else float(np.exp(rng.normal(np.log(7.0), 0.3)))
        hb = rng.normal(13.5, 1.4)
        plt = rng.normal(260, 70)
        blood_blasts = 0.0
        marrow_blasts = rng.uniform(1, 4.5)
    return {"wbc": float(np.clip(wbc, 0.8, 350)), "hb": float(np.clip(hb, 4.5, 17.5)),
            "plt": float(np.clip(plt, 6, 480)),
            "blood_blasts": float(np.clip(blood_blasts, 2, 95)) if leukemia else 0.0,
            "marrow_blasts": float(np.clip(marrow_blasts, 1, 97))}


def _blood_counts(rng: np.random.Generator, labs: dict[str, float], partial: bool) -> str:
    """The FBC line; partial notes carry only some of the overlapping counts and no blast figure."""
    items = [f"WBC {labs['wbc']:.1f} x10^9/L", f"Hb {labs['hb']:.1f} g/dL", f"platelets {labs['plt']:.0f} x10^9/L"]
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    if partial:
        items = items[: int(rng.integers(1, 4))]
    joined = ", ".join(items)
    form = int(rng.integers(3))
    if form == 0:
        return f"Labs: {joined}."
    if form == 1:
        return f"Full blood count showed {joined}."
    return f"FBC: {joined}."


def _full_findings(rng: np.random.Generator, leukemia: int, stage: int | None, lineage: str | None,
                   severity: float) -> list[str]:
    labs = _lab_values(rng, leukemia, severity)
    found = [_blood_counts(rng, labs, partial=False), _smear(rng, leukemia, labs)]
    if rng.random() < (0.8 if leukemia else 0.5):
        found.append(_marrow(rng, leukemia, labs))
    if rng.random() < (0.7 if leukemia else 0.4):
        found.append(_immunophenotype(rng, leukemia, lineage))
    found.append(_impression(rng, leukemia, stage, lineage))
    return found


def _smear(rng: np.random.Generator, leukemia: int, labs: dict[str, float]) -> str:
    if leukemia:
        pct = labs["blood_blasts"]
        return _pick(rng, (f"Peripheral smear: {pct:.0f}% blasts.",
                           f"Blood film shows circulating blasts, {pct:.0f}% of white cells.",
                           f"Peripheral blast count {pct:.0f}%.",
                           f"Smear reviewed: blasts {pct:.0f}%, large cells with fine chromatin."))
    return _pick(rng, ("Peripheral smear: no blasts seen.", "Blood film: no circulating blasts.",
                       "Smear shows reactive lymphocytosis, no blasts seen.",
                       "Film reviewed: mature neutrophils and lymphocytes, blasts 0%.",
                       "Smear: some reactive lymphocytes; no blasts identified."))


def _marrow(rng: np.random.Generator, leukemia: int, labs: dict[str, float]) -> str:
    pct = labs["marrow_blasts"]
    if leukemia:
        cellularity = int(rng.integers(70, 100))
        return _pick(rng, (f"Bone marrow aspirate: {pct:.0f}% blasts, hypercellular ({cellularity}%).",
                           f"Marrow is hypercellular at {cellularity}% with {pct:.0f}% blasts.",
                           f"BM biopsy: blasts {pct:.0f}%, cellularity {cellularity}%."))
    cellularity = int(rng.integers(30, 61))
    return _pick(rng, (f"Bone marrow aspirate: {pct:.0f}% blasts, normocellular ({cellularity}%).",
                       f"Marrow normocellular at {cellularity}%, blasts {pct:.0f}%, trilineage maturation.",
                       f"BM biopsy: blasts {pct:.0f}%, cellularity {cellularity}%, no infiltrate."))


def _immunophenotype(rng: np.random.Generator, leukemia: int, lineage: str | None) -> str:
    if not leukemia:
        return _pick(rng, ("Flow cytometry: no aberrant immature population.",
                           "Immunophenotyping shows polyclonal B cells and a normal T:B ratio.",
                           "Flow: no excess of CD34+ cells."))
    markers = MYELOID_MARKERS if lineage == "myeloid" else LYMPHOID_MARKERS
    chosen = [markers[i] for i in sorted(rng.choice(len(markers), size=int(rng.integers(2, 5)), replace=False))]
    listed = ", ".join(chosen[:-1]) + " and " + chosen[-1]
    tail = "" if lineage == "myeloid" else _pick(rng, ("", " MPO negative."))
    return _pick(rng, (f"Flow cytometry: blasts positive for {listed}.{tail}",
                       f"Immunophenotype: {' '.join(m + '+' for m in chosen)}.{tail}"))


def _impression(rng: np.random.Generator, leukemia: int, stage: int | None, lineage: str | None) -> str:
    if not leukemia:
        return _pick(rng, ("Impression: no evidence of leukemia; reactive picture.",
                           "Leukemia ruled out; likely post-viral reactive lymphocytosis.",
                           "Findings most consistent with iron deficiency, not leukemia.",
                           "Assessment: reactive changes only, no blasts seen.",
                           "Conclusion: benign reactive process; haematological malignancy excluded."))
    name = _pick(rng, ("acute myeloid leukemia", "AML", "acute myeloid leukaemia")) if lineage == "myeloid" \
        else _pick(rng, ("acute lymphoblastic leukemia", "B-ALL", "acute lymphoblastic leukaemia"))
    if rng.random() < 0.75:
        return _pick(rng, (f"Impression: {name}, {stage_phrase(rng, stage)}.",
                           f"Findings consistent with {name}; {stage_phrase(rng, stage)}.",
                           f"Diagnosis of {name}, {stage_phrase(rng, stage)}."))
    return _pick(rng, (f"Impression: {name}.", f"Findings consistent with {name}.",
                       f"Working diagnosis {name}; staging to follow."))


def stage_phrase(rng: np.random.Generator, stage: int) -> str:
    """A stage in one of several wordings: "stage II", "Stage 2", "stage two", ..."""
    number = stage + 1
    roman = to_roman(number)
    word = NUMBER_WORDS[number - 1] if number <= len(NUMBER_WORDS) else str(number)
    return _pick(rng, (f"stage {roman}", f"Stage {number}", f"stage {word}",
                       f"consistent with stage {roman} disease", f"staged as {roman}",
                       f"Stage {roman} at diagnosis", f"stage {number} disease"))


def to_roman(number: int) -> str:
    values = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
              (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))
    out = ""
    for value, letters in values:
        while number >= value:
            out += letters
            number -= value
    return out


def _arrange(rng: np.random.Generator, core: list[str], optional: list[str], closing: list[str]) -> list[str]:
    """Vary the order a little the way real notes do: history early or late, summary first or last."""
    presentation, findings = core[0], core[1:]
    sentences = [presentation]
    late_history = rng.random() < 0.3
    if not late_history:
        sentences += optional
    if findings and rng.random() < 0.25:
        findings = [findings[-1]] + findings[:-1]
    sentences += findings
    if late_history:
        sentences += optional
    return sentences + closing


def _fit_length(rng: np.random.Generator, sentences: list[str], optional: list[str]) -> str:
    """Pad short notes with uninformative sentences and trim long ones, keeping within the word range."""
    def words() -> int:
        return sum(len(s.split()) for s in sentences)

    extra = [s for s in HISTORY + PLANS if s not in sentences]
    order = rng.permutation(len(extra))
    for i in order:
        if words() >= MIN_WORDS:
            break
        sentences.insert(len(sentences) - 1 if len(sentences) > 1 else 1, extra[i])
    for sentence in optional:
        if words() <= MAX_WORDS:
            break
        sentences.remove(sentence)
    return " ".join(sentences)
