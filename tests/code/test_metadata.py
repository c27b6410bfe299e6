"""metadata.csv of every upstream schema version -> the same normalised, labelled rows."""

from lxn_ray.sources.metadata import (
    CT,
    MALFORMED_ROW,
    NON_FRONTAL,
    UNLABELLED,
    UNSAFE_PATH,
    VOLUMES,
    label_of,
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


def test_labels_flat_and_hierarchical_findings():
    assert label_of("COVID-19") == 1
    assert label_of("COVID-19, ARDS") == 1
    assert label_of("Pneumonia/Viral/COVID-19") == 1
    assert label_of(" covid-19 ") == 1
    assert label_of("Pneumonia/Viral/SARS") == 0
    assert label_of("No Finding") == 0
    assert label_of("ARDS") == 0
    for unlabelled in ("", "todo", "Unknown", "  "):
        assert label_of(unlabelled) is None


def test_early_schema_without_modality_or_folder():
    rows = parse_metadata(EARLY)
    assert [r.patient_id for r in rows] == ["2", "3", "4"]
    assert rows[0].exclusion is None and rows[0].label == 1 and rows[0].image_path == "images/a.jpeg"
    assert rows[1].exclusion == NON_FRONTAL
    assert rows[2].exclusion == CT  # early files mark CT in the view column


def test_later_schema_whitespace_views_and_exclusions():
    rows = {r.filename: r for r in parse_metadata(LATER)}
    d = rows["d.png"]
    assert (d.patient_id, d.label, d.exclusion, d.view) == ("7", 1, None, "AP Supine")
    assert d.extra["location"] == "Rome, Italy"
    assert rows["e.png"].exclusion is None and rows["e.png"].label == 0  # No Finding is a negative
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
