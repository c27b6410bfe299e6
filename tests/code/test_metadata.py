"""metadata.csv of every upstream schema version -> the same normalised rows, with findings (not labels)."""

import dataclasses

from lxn_ray.sources.metadata import (
    CT,
    MALFORMED_ROW,
    NON_FRONTAL,
    UNLABELLED,
    UNSAFE_PATH,
    VOLUMES,
    MetadataRow,
    parse_metadata,
)

EARLY = b"""Patientid,offset,sex,age,finding,survival,view,date,location,filename,doi, url,license,clinical notes,other notes
2,0,M,65,COVID-19,Y,PA,2020,,a.jpeg,,,,,
3,0,F,40,SARS,,L,2020,,b.jpeg,,,,,
4,0,F,40,Streptococcus,,CT,2020,,c.jpeg,,,,,
"""

LATER = b"""patientid,offset,sex,age,finding,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,
 7 ,1,M,50,  Pneumonia/Viral/COVID-19 ,AP  Supine,X-ray,,"Rome, Italy",images, d.png ,,,,"multi
line note",
8,,F,30,No Finding,ap semi erect,X-ray,,,images,e.png,,,,,
9,,F,30,todo,PA,X-ray,,,images,f.png,,,,,
10,,F,30,Unknown,PA,X-ray,,,images,g.png,,,,,
11,,F,30,COVID-19,Axial,CT,,,volumes,h.nii.gz,,,,,
12,,F,30,Pneumonia,PA,X-ray,,,volumes,i.png,,,,,
13,,F,30,COVID-19,?,X-ray,,,images,j.png,,,,,
14,,F,30,COVID-19,,X-ray,,,images,k.png,,,,,
15,,F,30,COVID-19,PA,X-ray,,,images,l.png,,,,,,,,extra,fields
16,,F,30,COVID-19,PA,X-ray,,,images,../../../etc/passwd,,,,,
17,,F,30,COVID-19,PA,X-ray,,,images,/etc/hostname,,,,,
"""


def test_rows_carry_findings_and_unlabelled_findings_are_excluded():
    # tasks (lxn_ray.sources.tasks) are the only place a finding becomes a label: a row has none
    assert "label" not in {f.name for f in dataclasses.fields(MetadataRow)}
    findings = [
        "COVID-19",
        "COVID-19, ARDS",
        "Pneumonia/Viral/COVID-19",
        " covid-19 ",
        "Pneumonia/Viral/SARS",
    ]
    unlabelled = ["", "todo", "Unknown", "  "]
    lines = [f'{i},PA,"{finding}",f{i}.png' for i, finding in enumerate(findings + unlabelled)]
    rows = parse_metadata(("patientid,view,finding,filename\n" + "\n".join(lines) + "\n").encode())
    assert [r.finding for r in rows[: len(findings)]] == [
        "COVID-19",
        "COVID-19, ARDS",
        "Pneumonia/Viral/COVID-19",
        "COVID-19",
        "Pneumonia/Viral/SARS",
    ]
    assert all(r.exclusion is None for r in rows[: len(findings)])
    assert [r.exclusion for r in rows[len(findings) :]] == [UNLABELLED] * len(unlabelled)


def test_early_schema_without_modality_or_folder():
    rows = parse_metadata(EARLY)
    assert [r.patient_id for r in rows] == ["2", "3", "4"]
    assert (
        rows[0].exclusion is None and rows[0].finding == "COVID-19" and rows[0].image_path == "images/a.jpeg"
    )
    assert rows[1].exclusion == NON_FRONTAL
    assert rows[2].exclusion == CT  # early files mark CT in the view column


def test_later_schema_whitespace_views_and_exclusions():
    rows = {r.filename: r for r in parse_metadata(LATER)}
    d = rows["d.png"]
    assert (d.patient_id, d.finding, d.exclusion, d.view) == (
        "7",
        "Pneumonia/Viral/COVID-19",
        None,
        "AP Supine",
    )
    assert d.extra["location"] == "Rome, Italy"
    assert rows["e.png"].exclusion is None and rows["e.png"].finding == "No Finding"  # a usable finding
    assert rows["f.png"].exclusion == UNLABELLED
    assert rows["g.png"].exclusion == UNLABELLED
    assert rows["h.nii.gz"].exclusion == CT
    assert rows["i.png"].exclusion == VOLUMES
    assert rows["j.png"].exclusion == NON_FRONTAL
    assert rows["k.png"].exclusion == NON_FRONTAL  # empty view
    assert rows["l.png"].exclusion == MALFORMED_ROW
    assert rows["../../../etc/passwd"].exclusion == UNSAFE_PATH
    assert rows["/etc/hostname"].exclusion == UNSAFE_PATH


def test_line_numbers_count_multiline_records():
    rows = parse_metadata(LATER)
    assert rows[0].line == 2
    assert rows[1].line == 4  # the quoted note of the first record spans two lines


def test_frontal_views_are_configurable():
    rows = parse_metadata(EARLY, frontal_views=("PA", "L"))
    assert rows[1].exclusion is None


def test_missing_filename_column_is_an_error():
    import pytest

    from lxn_ray.sources.metadata import MetadataError

    with pytest.raises(MetadataError):
        parse_metadata(b"patientid,finding\n1,COVID-19\n")
    with pytest.raises(MetadataError):
        parse_metadata(b"")
