"""Measure the clean stage's throughput, and the language detectors it could use.

    python benchmarks/clean_bench.py                       # default and web filters, 1 and 2 workers
    python benchmarks/clean_bench.py --code /path/to/other/checkout   # the same, on another checkout's code
    python benchmarks/clean_bench.py --against /path/to/old/checkout --repeat 3   # before and after, in turn
    python benchmarks/clean_bench.py --mb 48 --workers 1 2 4
    python benchmarks/clean_bench.py --language            # detectors: accuracy and speed

Throughput: each measurement runs the clean stage's STAGE.run in a fresh process, with a store of its own
holding an extract version of the embedded corpus (English prose from Python's documentation) repeated to
`--mb` MB, with one document in twenty replaced by a paragraph of another language, in shards of 2,000
documents. The time covers the whole stage (reading, normalising, filtering, writing, publishing) and the
start of its worker processes; MB/cpu-s divides by the CPU time of the stage's processes instead, which
moves far less with whatever else shares the cores (a tenth or so, where wall time can halve). `--code`
points the child processes at another checkout (an older commit, say), so that two versions of the stage
are measured on the same input and cores: a "before" and "after". `--against` measures that other checkout
in turn with this one (or with --code), one process each, alternating, and prints the ratio of the two;
`--repeat N` measures every setting N times and keeps the fastest of each (on shared cores, the run least
disturbed). Configurations a checkout does not know (the language filter's fields) are left out for it.

--language: for each detector installed (pycld2, py3langid, lingua-language-detector), how often it names
the right language on the labelled set below (English documents of the embedded corpus, paragraphs and
single sentences in six other languages, and mixed documents), and how fast it runs on the corpus; for
pycld2, also on long documents read whole or by their first few KB.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_DOCS = 2000
FOREIGN_EVERY = 20

# Prose written for measuring language identification: paragraphs of ~400 characters, then short lines.
PARAGRAPHS = {
    "fr": [
        "La bibliothèque municipale ouvre ses portes à neuf heures tous les jours sauf le dimanche. Les lecteurs "
        "peuvent emprunter jusqu'à cinq livres pour une durée de trois semaines, et les prolonger une fois en "
        "ligne ou au guichet. Une salle de lecture silencieuse se trouve au premier étage, à côté des journaux "
        "et des revues que l'on peut consulter sur place sans inscription.",
        "Quand nous sommes arrivés au village, la pluie avait cessé et le soleil éclairait les toits mouillés. "
        "Ma grand-mère nous attendait devant la porte avec une tarte aux pommes encore chaude. Nous avons passé "
        "l'après-midi à marcher le long de la rivière, en parlant de tout et de rien, jusqu'à ce que la nuit "
        "tombe et que les premières étoiles apparaissent au-dessus de la colline.",
        "Le gouvernement a présenté mercredi un projet de loi destiné à réduire la consommation d'énergie des "
        "bâtiments publics. Selon le ministre, les écoles et les hôpitaux devront remplacer leurs anciennes "
        "chaudières avant la fin de la décennie. Les syndicats saluent l'intention mais s'inquiètent du coût "
        "des travaux pour les communes les plus pauvres, qui manquent déjà de moyens.",
    ],
    "de": [
        "Die Stadtbibliothek ist montags bis samstags von neun bis achtzehn Uhr geöffnet. Leser dürfen bis zu "
        "fünf Bücher für drei Wochen ausleihen und die Leihfrist einmal verlängern, entweder im Internet oder "
        "an der Theke. Im ersten Stock gibt es einen ruhigen Lesesaal, in dem man Zeitungen und Zeitschriften "
        "ohne Anmeldung lesen kann, solange man sie danach wieder an ihren Platz legt.",
        "Als wir im Dorf ankamen, hatte der Regen aufgehört, und die Sonne schien auf die nassen Dächer. Meine "
        "Großmutter wartete schon vor der Tür mit einem warmen Apfelkuchen. Wir verbrachten den Nachmittag mit "
        "einem langen Spaziergang am Fluss entlang und redeten über Gott und die Welt, bis es dunkel wurde und "
        "die ersten Sterne über dem Hügel zu sehen waren.",
        "Die Regierung hat am Mittwoch einen Gesetzentwurf vorgestellt, der den Energieverbrauch öffentlicher "
        "Gebäude senken soll. Nach Angaben des Ministers müssen Schulen und Krankenhäuser ihre alten Heizkessel "
        "bis zum Ende des Jahrzehnts ersetzen. Die Gewerkschaften begrüßen das Vorhaben, sorgen sich aber um "
        "die Kosten für ärmere Gemeinden, denen schon jetzt das Geld fehlt.",
    ],
    "es": [
        "La biblioteca municipal abre sus puertas a las nueve de la mañana todos los días excepto el domingo. "
        "Los lectores pueden llevarse hasta cinco libros durante tres semanas y renovar el préstamo una vez, "
        "por internet o en el mostrador. En la primera planta hay una sala de lectura silenciosa donde se "
        "pueden consultar periódicos y revistas sin necesidad de inscribirse.",
        "Cuando llegamos al pueblo ya había dejado de llover y el sol brillaba sobre los tejados mojados. Mi "
        "abuela nos esperaba en la puerta con una tarta de manzana todavía caliente. Pasamos la tarde paseando "
        "junto al río, hablando de todo un poco, hasta que se hizo de noche y aparecieron las primeras "
        "estrellas sobre la colina.",
        "El Gobierno presentó el miércoles un proyecto de ley para reducir el consumo de energía de los "
        "edificios públicos. Según el ministro, las escuelas y los hospitales tendrán que sustituir sus viejas "
        "calderas antes del final de la década. Los sindicatos valoran la intención, pero les preocupa el coste "
        "de las obras para los municipios más pobres, que ya tienen pocos recursos.",
    ],
    "it": [
        "La biblioteca comunale apre alle nove del mattino tutti i giorni tranne la domenica. I lettori possono "
        "prendere in prestito fino a cinque libri per tre settimane e rinnovare il prestito una volta, online "
        "oppure allo sportello. Al primo piano c'è una sala di lettura silenziosa dove si possono consultare "
        "giornali e riviste senza bisogno di iscriversi.",
        "Quando siamo arrivati al paese aveva smesso di piovere e il sole illuminava i tetti bagnati. La nonna "
        "ci aspettava davanti alla porta con una torta di mele ancora calda. Abbiamo passato il pomeriggio a "
        "camminare lungo il fiume, parlando un po' di tutto, finché è calata la sera e sono comparse le prime "
        "stelle sopra la collina.",
        "Il governo ha presentato mercoledì un disegno di legge per ridurre i consumi energetici degli edifici "
        "pubblici. Secondo il ministro, scuole e ospedali dovranno sostituire le vecchie caldaie entro la fine "
        "del decennio. I sindacati apprezzano l'intenzione, ma temono i costi dei lavori per i comuni più "
        "poveri, che già oggi hanno pochi mezzi a disposizione.",
    ],
    "nl": [
        "De openbare bibliotheek is van maandag tot en met zaterdag open van negen tot zes uur. Leden mogen "
        "maximaal vijf boeken voor drie weken lenen en de uitleentermijn één keer verlengen, via de website of "
        "aan de balie. Op de eerste verdieping is een stille leeszaal waar je kranten en tijdschriften kunt "
        "lezen zonder dat je lid hoeft te worden.",
        "Toen we in het dorp aankwamen, was het opgehouden met regenen en scheen de zon op de natte daken. Mijn "
        "oma stond al bij de deur te wachten met een warme appeltaart. We brachten de middag door met een lange "
        "wandeling langs de rivier en praatten over van alles en nog wat, tot het donker werd en de eerste "
        "sterren boven de heuvel verschenen.",
        "De regering heeft woensdag een wetsvoorstel gepresenteerd dat het energieverbruik van openbare "
        "gebouwen moet verminderen. Volgens de minister moeten scholen en ziekenhuizen hun oude ketels voor het "
        "einde van het decennium vervangen. De vakbonden zijn blij met het plan, maar maken zich zorgen over de "
        "kosten voor armere gemeenten, die nu al weinig geld hebben.",
    ],
    "pt": [
        "A biblioteca municipal abre às nove horas da manhã todos os dias, exceto ao domingo. Os leitores podem "
        "levar até cinco livros durante três semanas e renovar o empréstimo uma vez, pela internet ou no balcão. "
        "No primeiro andar existe uma sala de leitura silenciosa onde se podem consultar jornais e revistas sem "
        "ser preciso fazer inscrição.",
        "Quando chegámos à aldeia já tinha parado de chover e o sol brilhava nos telhados molhados. A minha avó "
        "esperava-nos à porta com uma tarte de maçã ainda quente. Passámos a tarde a passear junto ao rio, a "
        "conversar sobre tudo e sobre nada, até que anoiteceu e apareceram as primeiras estrelas por cima da "
        "colina.",
        "O Governo apresentou na quarta-feira uma proposta de lei para reduzir o consumo de energia dos edifícios "
        "públicos. Segundo o ministro, as escolas e os hospitais terão de substituir as caldeiras antigas até ao "
        "fim da década. Os sindicatos elogiam a intenção, mas receiam o custo das obras para os municípios mais "
        "pobres, que já têm poucos recursos.",
    ],
}
SHORT = {
    "en": [
        "Open the file and read every line.",
        "The train leaves at noon tomorrow.",
        "Please close the door when you leave.",
        "We could not find the page you asked for.",
    ],
    "fr": [
        "Ouvrez le fichier et lisez chaque ligne.",
        "Le train part demain à midi.",
        "Merci de fermer la porte en partant.",
        "Nous n'avons pas trouvé la page demandée.",
    ],
    "de": [
        "Öffne die Datei und lies jede Zeile.",
        "Der Zug fährt morgen um zwölf Uhr ab.",
        "Bitte schließ die Tür, wenn du gehst.",
        "Wir konnten die gesuchte Seite nicht finden.",
    ],
    "es": [
        "Abre el archivo y lee cada línea.",
        "El tren sale mañana al mediodía.",
        "Por favor, cierra la puerta al salir.",
        "No hemos encontrado la página que buscabas.",
    ],
    "it": [
        "Apri il file e leggi ogni riga.",
        "Il treno parte domani a mezzogiorno.",
        "Per favore chiudi la porta quando esci.",
        "Non abbiamo trovato la pagina che cercavi.",
    ],
    "nl": [
        "Open het bestand en lees elke regel.",
        "De trein vertrekt morgen om twaalf uur.",
        "Doe alsjeblieft de deur dicht als je gaat.",
        "We konden de pagina die je zocht niet vinden.",
    ],
    "pt": [
        "Abra o ficheiro e leia cada linha.",
        "O comboio parte amanhã ao meio-dia.",
        "Por favor, feche a porta quando sair.",
        "Não encontrámos a página que procurava.",
    ],
}


# -- throughput --------------------------------------------------------------------------------------------

CONFIGS: dict[str, dict] = {
    "default": {},
    "default, no language filter": {"languages": []},
    "web": {"web": True},
    "web, no language filter": {"web": True, "languages": []},
}


def corpus(megabytes: float) -> list[tuple[str, str]]:
    """The embedded corpus repeated to `megabytes` MB, one document in FOREIGN_EVERY another language's."""
    from tasks.sample_data import default_corpus_documents

    base = [text for _, text in default_corpus_documents()]
    foreign = [text for texts in PARAGRAPHS.values() for text in texts]
    docs, size = [], 0
    while size < megabytes * 1e6:
        i = len(docs)
        text = foreign[i // FOREIGN_EVERY % len(foreign)] if i % FOREIGN_EVERY == 0 else base[i % len(base)]
        docs.append((f"doc-{i}", text))
        size += len(text.encode())
    return docs


def child(args: argparse.Namespace) -> None:
    """One measurement, in this process: publish the corpus as an extract version, time the clean stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.store import Store
    from tasks.clean import STAGE, CleanConfig

    settings = json.loads(args.child)
    overrides = {"workers": settings["workers"], **{k: v for k, v in settings["config"].items() if k != "web"}}
    if "languages" in overrides and "languages" not in CleanConfig.model_fields:
        print(json.dumps({"skipped": True}))
        return
    cfg = CleanConfig.web(**overrides) if settings["config"].get("web") else CleanConfig(**overrides)
    docs = corpus(settings["mb"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"

        def write(out: Path) -> None:
            (out / "docs").mkdir()
            for s, start in enumerate(range(0, len(docs), SHARD_DOCS)):
                rows = docs[start : start + SHARD_DOCS]
                table = pa.table(
                    {
                        "doc_id": [doc_id for doc_id, _ in rows],
                        "text": [text for _, text in rows],
                        "source": ["bench.tar.xz"] * len(rows),
                        "member": [f"{doc_id}.txt" for doc_id, _ in rows],
                        "n_bytes": [len(text.encode()) for _, text in rows],
                    }
                )
                pq.write_table(table, out / "docs" / f"shard-{s:05d}.parquet", compression="zstd")

        Store(root).publish("extract", "bench", write, params={}, inputs={}, code_version="bench")
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        ref = STAGE.run(root, cfg, {"extract": "bench"})
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        metrics = Store(root).manifest("clean", ref.version)["metrics"]
    print(
        json.dumps(
            {"seconds": seconds, "cpu": cpu, "bytes": metrics["bytes_in"], "docs": metrics["docs_in"], **metrics}
        )
    )


def _cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the worker processes, once their pool closed):
    what the stage costs whatever else the cores are busy with."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(code: Path, config: dict, workers: int, megabytes: float) -> dict | None:
    """One measurement of `code`'s clean stage in a fresh process; None where it has no such setting."""
    env = {**os.environ, "PYTHONPATH": str(code), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    settings = json.dumps({"config": config, "workers": workers, "mb": megabytes})
    done = subprocess.run(
        [sys.executable, __file__, "--child", settings], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return None if result.get("skipped") else result


def throughput(args: argparse.Namespace) -> None:
    code = Path(args.code).resolve() if args.code else ROOT
    codes = [code] + ([Path(args.against).resolve()] if args.against else [])
    for i, each in enumerate(codes):
        label = f" [{'ab'[i]}]" if args.against else ""
        print(f"clean stage{label} on {each}")
    repeat = f", fastest of {args.repeat} runs" if args.repeat > 1 else ""
    print(f"{args.mb:g} MB of the embedded corpus, shards of {SHARD_DOCS} documents{repeat}")
    column = "code " if args.against else ""
    print(f"{'filters':30} {'workers':>7} {column}{'MB/s':>7} {'docs/s':>8} {'MB/cpu-s':>8} {'kept':>7}  removed")
    for name, config in CONFIGS.items():
        for workers in args.workers:
            best: list[dict | None] = [None] * len(codes)
            for _ in range(args.repeat):
                for i, each in enumerate(codes):  # in turn, so that a busy spell slows both alike
                    result = measure(each, config, workers, args.mb)
                    if result is not None:
                        best[i] = _faster(best[i], result)
            for i, result in enumerate(best):
                label = f"{'ab'[i]:>4} " if args.against else ""
                if result is None:
                    print(f"{name:30} {workers:>7} {label}  (this checkout has no such setting)")
                    continue
                removed = result["removed_by_reason"]
                print(
                    f"{name:30} {workers:>7} {label}{result['mb/s']:>7.1f} {result['docs/s']:>8.0f} "
                    f"{result['mb/cpu-s']:>8.1f} {result['kept']:>7}  {removed}"
                )
            if args.against and None not in best:
                after, before = best
                print(
                    f"{'':30} {'':>7}  a/b {after['mb/s'] / before['mb/s']:>6.2f}x {'':>8} "
                    f"{after['mb/cpu-s'] / before['mb/cpu-s']:>7.2f}x"
                )


def _faster(kept: dict | None, result: dict) -> dict:
    """`result` with its rates (MB/s, docs/s, MB/cpu-s), each the better of its own and those `kept` so far."""
    rates = {
        "mb/s": result["bytes"] / result["seconds"] / 1e6,
        "docs/s": result["docs"] / result["seconds"],
        "mb/cpu-s": result["bytes"] / result["cpu"] / 1e6,
    }
    if kept is not None:
        rates = {key: max(value, kept[key]) for key, value in rates.items()}
    return {**result, **rates}


# -- language detectors ------------------------------------------------------------------------------------


def detectors() -> dict[str, Callable[[str], tuple[str, float]]]:
    """The detectors installed, each as text -> (ISO 639-1 code, score)."""
    found: dict[str, Callable[[str], tuple[str, float]]] = {}
    try:
        from tasks.language import detect_language

        found["pycld2 (as the clean stage calls it)"] = lambda text: tuple(detect_language(text, 10**9))
    except ImportError:
        print("pycld2: not installed")
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        found["py3langid"] = identifier.classify
    except ImportError:
        print("py3langid: not installed")
    try:
        from lingua import LanguageDetectorBuilder

        for mode in ("low", "high"):
            builder = LanguageDetectorBuilder.from_all_languages()
            detector = (builder.with_low_accuracy_mode() if mode == "low" else builder).build()

            def lingua(text: str, detector=detector) -> tuple[str, float]:
                top = detector.compute_language_confidence_values(text)[0]
                return top.language.iso_code_639_1.name.lower(), top.value

            found[f"lingua ({mode} accuracy mode)"] = lingua
    except ImportError:
        print("lingua-language-detector: not installed")
    return found


def labelled(english: list[str]) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(0)
    sample = rng.sample(english, 300)
    return {
        "English documents": [(text, "en") for text in english],
        "paragraphs": [(text, lang) for lang, texts in PARAGRAPHS.items() for text in texts],
        "sentences": [(text, lang) for lang, texts in SHORT.items() for text in texts],
        "mostly English, a French/German/... line": [
            (sample[i][:1500] + "\n\n" + PARAGRAPHS[lang][0][:150], "en") for i, lang in enumerate(PARAGRAPHS)
        ],
        "another language, a code example": [
            (" ".join(texts) + "\n\n>>> import json\n>>> json.dumps(x)", lang) for lang, texts in PARAGRAPHS.items()
        ],
    }


def language(args: argparse.Namespace) -> None:
    from tasks.clean import normalize_text
    from tasks.language import detect_language
    from tasks.sample_data import default_corpus_documents

    english = [normalize_text(text) for _, text in default_corpus_documents()]
    english_bytes = sum(len(text.encode()) for text in english)
    sets = labelled(english)
    for name, detect in detectors().items():
        detect("warm up")
        print(name)
        for set_name, items in sets.items():
            found = [detect(text) for text, _ in items]
            right = [score for (code, score), (_, lang) in zip(found, items, strict=True) if code == lang]
            low = f", lowest score when right {min(right):.2f}" if right else ""
            print(f"    {set_name:42} {len(right):>4}/{len(items):<4} right{low}")
        start = time.perf_counter()
        for text in english:
            detect(text)
        seconds = time.perf_counter() - start
        print(f"    speed on the corpus: {english_bytes / seconds / 1e6:.1f} MB/s, {len(english) / seconds:.0f} docs/s")
    rng = random.Random(1)
    long_docs = ["\n\n".join(rng.sample(english, 60)) for _ in range(40)]
    long_bytes = sum(len(text.encode()) for text in long_docs)
    print(
        f"pycld2 on {len(long_docs)} English documents of ~{long_bytes / len(long_docs) / 1e3:.0f} KB, by sample size:"
    )
    for chars in (1024, 2048, 4096, 8192, 10**9):
        start = time.perf_counter()
        found = [detect_language(text, chars) for text in long_docs]
        seconds = time.perf_counter() - start
        right = [score for code, score in found if code == "en"]
        label = "whole" if chars == 10**9 else f"first {chars}"
        print(
            f"    {label:>11} chars: {len(right)}/{len(found)} English, lowest score {min(right):.2f}, "
            f"{long_bytes / seconds / 1e6:.1f} MB/s"
        )
    scores = sorted(
        detect_language(text, 4096).score for text in english if detect_language(text, 4096).language == "en"
    )
    print(f"English corpus documents' scores (4096 chars): lowest ten {scores[:10]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=96.0, help="corpus size in MB of text")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--code", help="a checkout whose clean stage to measure (default: this one)")
    parser.add_argument("--against", help="another checkout to measure in turn with it, and the ratio of the two")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting, of which the fastest counts")
    parser.add_argument("--language", action="store_true", help="measure the language detectors instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: measure each setting at least once")
    if args.child:
        child(args)
    elif args.language:
        sys.path.insert(0, str(ROOT))
        language(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
